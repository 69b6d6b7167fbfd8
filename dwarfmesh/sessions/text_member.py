"""A member's side of a text-level session: rank or fuse across tokenizers.

A text member holds TEXT, not ids: the prompt rendered by its own chat template (or the
raw prompt) plus the committed answer. The engine keeps the matching ids and KV cache
(`Engine.text_open` / `text_extend`: re-encode, trim to the common prefix, prefill the
tail). Per message from the leader, in arrival order (one lock):

- `TextOpen`: render and prefill the prompt, then answer for step 0 (in select mode
  the Proposal is the member's whole answer, written here without a round trip);
- `Candidates` (rank): score every candidate in one batched forward -> `Scores`;
- `Commit`: check the text hash, append the committed text, then answer for the next
  step: a `Proposal` (rank: a continuation up to a word or line boundary) or a
  `TextFrame` (fuse: the next piece's top-k as strings, with the exact log p of the text
  just committed, for online weights);
- `End`: free (or keep, for a conversation) the cache.

A member that cannot go on (engine busy, diverged text, an error) sends `Leave`. As on
the id path, only the leader of the best (term, rank) claim is followed (`follow`), and a
copy of a request this member already answered (the leader asking again for a reply it
lost) is answered with the same reply.

Failover, as on the id path (`roles.py`): when the leader dies, every member ranks the
session's surviving members by the same rendezvous hash; the first takes over (a
`text_leader.TextLeaderSession` resumed from its committed text, which every member holds: they
all applied the same Commits), the others wait for its `Resume` and answer again for the
step they are at. When the dead leader's last Commit reached only some, a member ahead
hands the new leader the Commits it lacks (`text_resume`: it adopts them) and one
behind catches up on those the new leader re-sends. A client whose node died
re-attaches to another node (`Attach`), and the leader replays the Commits it missed.

Owns: one text member's state and its answers. Does not: decide who takes over, or
keep the node's table of text sessions (who leads, who is a member): that is `text_table`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from jinja2 import TemplateError

from dwarfmesh.fusion import text as textfuse
from dwarfmesh.sessions.member import follow_leader
from dwarfmesh.sessions.ports import Send
from dwarfmesh.sessions.text_resume import TextResume
from dwarfmesh.wire.modes import Mode
from dwarfmesh.wire.protocol import (
    Candidates,
    Commit,
    GenParams,
    Leave,
    Proposal,
    Resume,
    Scores,
    TextFrame,
    TextOpen,
)

log = logging.getLogger(__name__)



class TextMemberSession:
    def __init__(self, msg: TextOpen, *, me: str, engine: Any, send: Send) -> None:
        self.session, self.leader = msg.session, msg.leader
        self.params: GenParams = msg.params
        self.mode, self.keep = Mode.from_text_open(msg.mode), msg.keep
        self.origin, self.members = msg.origin, list(msg.members)
        self.open_msg = msg
        self.propose_tokens = msg.propose_tokens
        self.pieces: list[str] = []         # the committed answer, piece by piece (failover)
        self.hashes: list[int] = []         # text_hash after each piece
        self.taken_over = False
        self.me, self.engine, self.send = me, engine, send
        self.fresh: Callable[[str], bool] = lambda _node: False   # set by TextTable
        self.step = 0                       # the step this member answers next
        self.hash = textfuse.TEXT_HASH_START
        self.answer = ""
        self.closed = False
        self.term = msg.term
        self.claimed = True                  # `leader` has led us in `term` (see follow)
        self.last_heard = time.monotonic()   # from the leader (idle sessions are freed)
        self.last_reply: Any = None          # answered again when the leader asks again
        self._lock = asyncio.Lock()

    def follow(self, sender: str, term: int) -> bool:
        """Whether a message from `sender` in `term` is this session's leader's (see
        `member.follow_leader`)."""
        return follow_leader(self, sender, term)

    def again(self, kind: type, step: int) -> None:
        """The leader asked again for the reply to step `step`: send it, if it was made."""
        if (not self.closed and isinstance(self.last_reply, kind)
                and self.last_reply.step == step):
            self.send(self.leader, self.last_reply)

    async def open(self) -> None:
        async with self._lock:
            m = self.open_msg
            try:
                text, templated = self.engine.render_prompt(m.prompt, m.messages,
                                                            self.params.chat)
                out = await self.engine.text_open(self.session, text, templated)
            except (RuntimeError, ValueError, KeyError, TypeError, TemplateError) as exc:
                return await self._leave(f"cannot open: {exc}")
            nll = -out.logp / out.nbytes if out.nbytes else None
            await self._answer(m.propose_tokens, None, nll, out.forward_ms)

    async def candidates(self, msg: Candidates) -> None:
        async with self._lock:
            if self.closed or msg.step != self.step:
                return
            if isinstance(self.last_reply, Scores) and self.last_reply.step == msg.step:
                return self.again(Scores, msg.step)
            if len(msg.texts) != len(msg.eos) or not msg.texts:
                return await self._leave("malformed candidates")
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            try:
                nll = await self.engine.score(self.session, list(msg.texts), list(msg.eos))
            except (RuntimeError, ValueError, KeyError) as exc:
                return await self._leave(f"cannot score: {exc}")
            self._reply(Scores(self.session, msg.step, self.me, self.hash, nll,
                               (loop.time() - t0) * 1000.0))

    async def commit(self, msg: Commit) -> None:
        async with self._lock:
            if not self.closed and msg.step == self.step - 1:
                return self.again(Proposal if self.mode.proposes else TextFrame, self.step)
            if self.closed or msg.step != self.step:
                return
            expected = textfuse.text_hash(self.hash, msg.text)
            if expected != msg.text_hash:
                return await self._leave(f"committed text diverged at step {msg.step}")
            self.hash, self.step = expected, self.step + 1
            self.answer += msg.text
            self.pieces.append(msg.text)
            self.hashes.append(expected)
            self.propose_tokens = msg.propose_tokens
            if msg.final:
                # Bring the cache up to date for the next turn of a conversation only.
                if self.keep:
                    await self._extend(msg.text)
                return await self._close(keep=self.keep)
            out = await self._extend(msg.text)
            if out is not None:
                await self._answer(msg.propose_tokens, out.logp, None, out.forward_ms)

    async def end(self) -> None:
        self.engine.text.interrupt(self.session)     # a whole answer being written: stop
        async with self._lock:
            await self._close(keep=self.keep)

    async def leader_gone(self, why: str) -> None:
        """No leader of the session spoke for `MEMBER_IDLE_S` (the member sweep): free
        the state."""
        async with self._lock:
            log.warning("session %s: leader %s is gone and %s; dropping this text session",
                        self.session, self.leader, why)
            await self._close(keep=False)

    async def resume(self, msg: Resume) -> None:
        """A new leader after a failover: answer it for the step this member is at. A
        member ahead of it (the dead leader's last Commit reached only some) first sends
        it the Commits it lacks, which it adopts; one behind was sent the new leader's
        Commits just before the Resume, so it has caught up by now."""
        async with self._lock:
            if self.closed:
                return
            if msg.step > self.step:
                return await self._leave(f"at step {self.step}, the new leader at {msg.step}")
            for step in range(msg.step, self.step):
                self.send(self.leader, Commit(self.session, step, self.pieces[step],
                                              self.hashes[step], False, self.propose_tokens))
            await self._answer(self.propose_tokens, None, None, 0.0)

    def resume_state(self) -> TextResume:
        """What a takeover needs: the committed answer, piece by piece."""
        return TextResume(list(self.pieces))

    # --- inside -------------------------------------------------------------------------

    async def _extend(self, piece: str) -> Any:
        try:
            return await self.engine.text_extend(self.session, piece)
        except (RuntimeError, ValueError, KeyError) as exc:
            await self._leave(f"cannot re-sync: {exc}")
            return None

    async def _answer(self, propose_tokens: int, prev_logp: float | None,
                      prompt_nll: float | None, spent_ms: float) -> None:
        """What the leader wants for `self.step`: a Proposal (rank) or a TextFrame (fuse)."""
        p = self.params
        try:
            if self.mode.proposes:
                # max_tokens counts each member's own tokens: the leader ends the answer
                # when one member's count reaches it, whoever leads.
                used = len(self.engine.tokenizer.encode(self.answer, add_special_tokens=False)
                           ) if self.answer else 0
                budget = min(propose_tokens, p.max_tokens - used)
                seed = [p.seed or 0, self.step, zlib.crc32(self.me.encode())]
                whole = self.mode is Mode.SELECT      # the whole answer at once
                out = (await self.engine.propose(self.session, budget, p.temperature, seed,
                                                 whole, p.stop if whole else ())
                       if budget > 0 else None)
                msg: Any = Proposal(self.session, self.step, self.me, self.hash,
                                    out.text if out else "", out.eos if out else False, used,
                                    prompt_nll, spent_ms + (out.forward_ms if out else 0.0))
            else:
                top = await self.engine.text_topk(self.session, p.top_k)
                msg = TextFrame(self.session, self.step, self.me, self.hash, top.rest_mass,
                                top.eos_logp, prev_logp, prompt_nll, spent_ms + top.forward_ms,
                                top.texts, np.asarray(top.logprobs, dtype=np.float16))
        except (RuntimeError, ValueError, KeyError) as exc:
            return await self._leave(f"cannot compute step {self.step}: {exc}")
        self._reply(msg)

    def _reply(self, msg: Any) -> None:
        if not self.closed:
            self.last_reply = msg
            self.send(self.leader, msg)

    async def _leave(self, reason: str) -> None:
        log.warning("session %s: leaving: %s", self.session, reason)
        await self._close(keep=False)
        self.send(self.leader, Leave(self.session, self.me, reason))

    async def _close(self, keep: bool) -> None:
        if not self.closed:
            self.closed = True
            await self.engine.close(self.session, keep=keep)
