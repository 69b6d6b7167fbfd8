"""An id session's leader after a failover, and the members a leader finds behind it.

The failover half of `leader.LeaderSession` (which holds the state it uses):

- `_resume`: a member that takes over (`roles`: the first surviving member by rendezvous
  rank) starts from the committed state it kept (`member.MemberSession.state`): prompt,
  committed ids, prefix hashes, its last frame. It sends `Resume`; every survivor answers
  with its latest frame. A member whose frame is a round ahead got the dead leader's last
  Token(s) when this node did not: the new leader adopts them as committed
  (`_ahead_ids`: a frame's `last_token`, or a speculative round's `round_ids`), since the
  client may have streamed them already.
- `_catch_up`: a frame for a step already committed comes from a member that missed
  Tokens (lost, or sent by a leader that died before reaching it): it is sent what it
  lacks, at most once per resend interval.
- `_replay_committed`: the text and the Token messages of what was committed before this
  leader, for re-attaching clients and members behind.

Owns: the takeover and catching up. Does not: decide who takes over (`roles`), or run
the decode loop after it (`leader`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from dwarfmesh.sessions.answer import answer_detokenizer
from dwarfmesh.sessions.deadlines import resend_interval
from dwarfmesh.wire.protocol import Frame, Resume, Token, extend_hash

log = logging.getLogger(__name__)


class Takeover:
    """The failover half of `leader.LeaderSession`."""

    session: str
    AHEAD: int

    def _catch_up(self, frame: Frame) -> None:
        """A frame for a step already committed: that member missed Tokens (lost, or sent
        by a leader that died before reaching it). Send it what it lacks, at most once per
        resend interval (its answer to duplicates is its frame again)."""
        step = frame.step
        if not 0 <= step < len(self._hashes) or self._hashes[step] != frame.prefix_hash:
            return
        now = time.monotonic()
        if now - self._caught_up.get(frame.sender, 0.0) < resend_interval(self._slowest_s):
            return
        self._caught_up[frame.sender] = now
        for msg in self.sent[step:len(self._hashes)]:
            if isinstance(msg, Token):
                self.stats.wire_bytes += self.send(frame.sender, msg)

    def _ahead_ids(self, frame: Frame, n: int) -> list[int]:
        """The `n` tokens a member's frame is ahead of this (new) leader by: a Token the
        dead leader sent to only some members. [] when the frame cannot say."""
        return [frame.last_token] if n == 1 and frame.last_token >= 0 else []

    def _replay_committed(self, committed: list[int]) -> str:
        """Detokenize the tokens committed before this leader (a takeover): for the text,
        and for re-attaching clients and members behind, who may need their Tokens."""
        self._detok = answer_detokenizer(self.engine.detokenizer(),
                                         chat=self.params.chat)
        for i, t in enumerate(committed):
            self._detok.add_token(t)
            piece = self._detok.last_segment      # read every time: the next is new text
            if i >= len(self.sent):
                after = self._hashes[i + 1] if i + 1 < len(self._hashes) else self._hash
                self.sent.append(Token(self.session, i, t, after, piece, False, self.term))
        return self._detok.text if committed else ""

    async def _resume(self) -> tuple[list[int], list[int], dict[str, Frame]]:
        """Take over from a dead leader, from the committed state this node kept."""
        state = self.resume_from
        prompt_ids, committed = list(state["prompt_ids"]), list(state["committed"])
        self._hash = state["hash"]
        self._hashes = list(state["hashes"])
        step = len(committed)
        own = state["last_frame"]
        if own is None:
            raise RuntimeError("no frame computed yet: nothing to resume from")
        log.warning("session %s: taking over as leader at step %d (term %d)", self.session,
                    step, self.term)
        self._replay_committed(committed)
        resume = Resume(self.session, self.me.node_id, step, self.term)
        frames = await self._gather(step, lambda only: self._broadcast(resume, only),
                                    _ready(own), ahead_ok=True)
        ahead = dict(self._ahead)
        if ahead and self.deposed is None:
            # Some members got the dead leader's last Token(s) before it died: adopt them.
            first = next(iter(ahead.values()))
            toks = self._ahead_ids(first, first.step - step)
            ahead = {m: f for m, f in ahead.items() if f.step == first.step}
            msgs = []
            for i, tok in enumerate(toks):
                self._detok.add_token(tok)
                self._hashes.append(self._hash)
                self._hash = extend_hash(self._hash, tok)
                msgs.append(Token(self.session, step + i, tok, self._hash,
                                  self._detok.last_segment, False, self.term))
            committed.extend(toks)
            behind = {m for m in frames if m != self.me.node_id}
            for token_msg in msgs:
                self.sent.append(token_msg)
                self.send(self.origin, token_msg)
            local = self.engine.step(self.session, toks, self.params.top_k)
            frames = await self._gather(
                step + len(toks), lambda only: [self._to(m, behind if only is None else only)
                                                for m in msgs], local, preset=ahead)
        return prompt_ids, committed, frames


async def _ready(value: Any) -> Any:
    return value
