"""The decode leader's loop for one session (a member's side is in `member.py`).

The life of one token (`LeaderSession._decode`):

1. The leader has every member's frame for step s (top-k ids + float16 log-probs, the
   rest mass, the exact log p of the token committed at s-1). Frames whose prefix hash
   does not match the leader's committed prefix are dropped (that member diverged).
2. `pools.fuse` pools them under the current weights; `pools.choose` picks the token.
3. The leader sends `Token(s, id, hash)` to every remote member and to the origin node
   (which streams the text to the client), *then* computes its own next frame locally,
   so its forward runs while the members compute theirs.
4. Members append the token to their KV cache and answer with the frame for step s+1;
   online weights learn from each frame's `prev_logp`.

A member that does not answer within the step timeout, or that the node declares dead,
is dropped and the answer goes on with the others. With a step deadline, the leader
fuses what has arrived by then (never fewer than one frame) and counts the late ones;
late members stay in the session and catch up. A new leader after a failover runs the
same loop from the committed state a member kept (`resume.Takeover`). Sampling is seeded per
step (seed, step), so a new leader draws what the old one would have drawn.

Owns: the id leader's loop (open, rounds, fuse and choose, commit with one hash chain
and the one stop-string rule, End). Does not: wait for replies (`round`), take over
(`resume`), or decide who may send what (`router`, `roles`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dwarfmesh.config import (
    MAX_PROMPT_TOKENS,
    ONLINE_ALPHA,
    ONLINE_ETA,
    OPEN_RESEND_S,
    PERPLEXITY_TAU,
)
from dwarfmesh.fusion import pools
from dwarfmesh.fusion.textcut import stop_at
from dwarfmesh.sessions.answer import held_text
from dwarfmesh.sessions.deadlines import prefill_bound, reply_bound, resend_interval
from dwarfmesh.sessions.lead import Lead
from dwarfmesh.sessions.resume import Takeover
from dwarfmesh.sessions.round import Round, Trigger
from dwarfmesh.sessions.stats import SessionStats
from dwarfmesh.wire.protocol import (
    End,
    Frame,
    Open,
    Token,
    extend_hash,
    prefix_hash,
)

log = logging.getLogger(__name__)

FRAME_LOGP_SLACK = 0.01              # float16 rounding of a frame's log-probabilities
MIN_LOGP = -1e3                      # keeps online weights finite whatever a member claims


class PromptTooLong(ValueError):
    """The prompt does not fit the members' context (or the protocol's limit)."""


class LeaderSession(Takeover, Lead):
    """Runs one answer as decode leader over `members` (this node is one of them)."""

    AHEAD = 1              # tokens a member can be ahead of a new leader (one Token)

    def __init__(self, *, resume_from: dict[str, Any] | None = None, **lead: Any) -> None:
        super().__init__(**lead)
        self.resume_from = resume_from
        self.stats = SessionStats(self.names)
        self._expect: set[int] = set()
        self._ahead: dict[str, Frame] = {}       # frames one step ahead (after a failover)
        self._hash = 0
        self._hashes: list[int] = []             # prefix hash before each committed token
        self.own_out: Any = None
        self.tokens: list[int] = []
        self.prompt_ids: Any = []
        self.weights: dict[str, float] = {}

    # --- inputs from the node ---------------------------------------------------------

    def on_frame(self, frame: Frame, size: int) -> None:
        step = min(self._expect) if self._expect else -1
        if frame.sender not in self._ids():
            self.stats.stale_frames += 1
            return
        if frame.step not in self._expect:
            self.stats.stale_frames += 1             # after its step was fused, or unknown
            self._catch_up(frame)
            return
        ahead = [] if frame.step == step else self._ahead_ids(frame, frame.step - step)
        want = prefix_hash(ahead, self._hash) if ahead else self._hash
        if frame.step != step and not ahead or frame.prefix_hash != want:
            log.warning("session %s: %s diverged at step %d; leaving it out", self.session,
                        frame.sender, frame.step)
            self.member_lost(frame.sender)
            return
        self.stats.frame_bytes += size
        self.stats.wire_bytes += size
        self._slowest_s = max(self._slowest_s, frame.forward_ms / 1000.0)
        if frame.step == step:
            self._round.offer(frame.sender, frame)
        else:
            self._ahead[frame.sender] = frame
            self._round.count(frame.sender)

    def set_origin(self, origin: str, next_step: int) -> None:
        """A client re-attached through another node: stream there, from `next_step`."""
        self.origin = origin
        for msg in self.sent[next_step:]:
            self.send(origin, msg)

    # --- gathering frames -------------------------------------------------------------

    async def _gather(self, step: int, send: Trigger, local: Any, ahead_ok: bool = False,
                      preset: dict[str, Frame] | None = None,
                      among: Callable[[], list[str]] | None = None) -> dict[str, Frame]:
        """Expect frames for `step` (and, after a takeover, one round ahead), send what
        triggers them, add the local one, and wait as a `Round` does (for the frames of
        every member, or of those `among` returns)."""
        self._expect = set(range(step, step + 1 + (self.AHEAD if ahead_ok else 0)))
        self._ahead = {}
        self._round = rnd = Round(among or self._ids, send, me=self.me.node_id,
                                  preset=preset)
        rnd.open()
        t0 = time.monotonic()
        if local is not None:
            out = await local
            if not isinstance(out, Frame):
                self.own_out, out = out, self._own(step, out)
            self._slowest_s = max(self._slowest_s, out.forward_ms / 1000.0)
            rnd.offer(self.me.node_id, out)
        if not rnd.complete:            # else: a one-node mesh, or every frame is in
            first = step == 0 and self.resume_from is None
            limit = (prefill_bound(time.monotonic() - t0) if first
                     else reply_bound(self._slowest_s, self.step_timeout_s))
            outcome = await rnd.close(
                limit, OPEN_RESEND_S if first else resend_interval(self._slowest_s),
                None if first else self.step_deadline_s)
            for node_id in outcome.late:
                self.stats.late[node_id] += 1
            for node_id in outcome.silent:
                log.warning("session %s: %s sent no frame for step %d in %.1fs; leaving it "
                            "out", self.session, node_id, step, limit)
                self.member_lost(node_id)
        self._expect = set()
        return dict(rnd.replies)

    def summary_extra(self) -> dict[str, Any]:
        """What a kind of session adds to the End's summary."""
        return {}

    def _own(self, step: int, out: Any) -> Frame:
        return Frame(self.session, step, self.me.node_id, self._hash, out.rest_mass,
                     out.prev_logp, -1, out.prompt_nll, out.forward_ms, out.ids, out.logprobs)

    def _broadcast(self, msg: Any, only: set[str] | None = None) -> None:
        """To the remote members (or those in `only`), then the origin: members first, so
        an origin never shows a token that no surviving member holds."""
        sent = set()
        for m in self.members:
            if m.node_id != self.me.node_id and (only is None or m.node_id in only):
                self.stats.wire_bytes += self.send(m.node_id, msg)
                sent.add(m.node_id)
        if isinstance(msg, (Token, End)) and (isinstance(msg, End) or msg.step == len(self.sent)):
            self.sent.append(msg)
        if not isinstance(msg, Open) and self.origin not in sent and (
                only is None or self.origin in only):
            self.send(self.origin, msg)

    def _to(self, msg: Any, ids: set[str]) -> None:
        for node_id in ids:
            if node_id != self.me.node_id:
                self.stats.wire_bytes += self.send(node_id, msg)

    # --- the session --------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Decode until EOS, a stop string, max_tokens or cancellation; return the summary."""
        p, t_start = self.params, time.perf_counter()
        if self.resume_from is not None:
            prompt_ids, committed, frames = await self._resume()
        else:
            prompt_ids = (self.engine.encode_chat(self.messages) if self.messages
                          else self.engine.encode(self.prompt, chat=p.chat))
            limit = min(MAX_PROMPT_TOKENS, self.engine.context_length or MAX_PROMPT_TOKENS)
            if len(prompt_ids) + 1 > limit:
                raise PromptTooLong(f"prompt too long: {len(prompt_ids)} tokens, this "
                                    f"mesh takes at most {limit - 1}")
            self._hash, committed = prefix_hash(prompt_ids), []
            if self.messages and not p.chat:
                # A chat session, also for whoever takes it over (it gets the params only).
                self.params = p = dataclasses.replace(p, chat=True)
            open_msg = Open(self.session, self.me.node_id, self.origin,
                            [m.node_id for m in self.members], p, self.keep,
                            np.asarray(prompt_ids, dtype=np.uint32), self.term)
            local = self.engine.open(self.session, prompt_ids, p.top_k)
            frames = await self._gather(0, lambda only: self._broadcast(
                open_msg, only=({m.node_id for m in self.members} - set(self._round.replies))
                if only is None else only), local)
            self.stats.prompt_reused = getattr(self.own_out, "reused", 0)
        self.prompt_ids = prompt_ids
        self.stats.mark_first_token(t_start)
        try:
            reason, text = await self._decode(committed, frames)
        finally:
            await self.engine.close(self.session, keep=self.keep and self.deposed is None)
        summary = self.stats.summary(
            text=text, tokens=self.tokens, reason=reason, leader=self.me.name,
            members=self.members, excluded=self.excluded, prompt_tokens=len(prompt_ids),
            weights=self.weights, dropped=[m.name for m in self.dropped])
        summary.extra.update(self.summary_extra())
        if self.term:
            summary.extra["term"] = self.term
        summary = summary.to_dict()
        if self.deposed is None:
            self._broadcast(End(self.session, reason, summary, self.term))
        return summary

    async def _decode(self, committed: list[int], frames: dict[str, Frame]) -> tuple[str, str]:
        p = self.params
        text = self._begin(committed, frames)
        for step in range(len(committed), p.max_tokens):
            if self.deposed is not None:
                return "deposed", text
            if not frames:
                return "error: no member frames", text
            t0 = time.perf_counter()
            order, fused = self._fuse(frames)
            tok = pools.choose(fused, temperature=p.temperature, top_p=p.top_p,
                                rng=self._rng(step))
            self.stats.fused(order, fused.member_top, tok, time.perf_counter() - t0)
            token_msg, reason, text = self._append(step, tok, text)
            if reason is not None:
                self._broadcast(token_msg)
                return reason, text
            t_step = time.perf_counter()
            local = self.engine.step(self.session, tok, p.top_k)
            fused_on = frames
            frames = await self._gather(step + 1, lambda only, m=token_msg: self._broadcast(
                m, only), local)
            self.stats.stepped(time.perf_counter() - t_step, frames)
            self._learn(frames, fused_on, tok)
        return "length", text

    def _begin(self, committed: list[int], frames: dict[str, Frame]) -> str:
        """Decoding starts (or resumes) after `committed`: weights from the first frames;
        the text so far."""
        self.tokens = list(committed)
        self.weights = self._initial_weights(frames)
        return self._replay_committed(committed)

    def _fuse(self, frames: dict[str, Frame]) -> tuple[list[str], pools.Fused]:
        """Pool one position's frames (in the session's member order) under the weights."""
        order = [m.node_id for m in self.members if m.node_id in frames]
        return order, pools.fuse([frames[m].ids for m in order],
                                  [frames[m].logprobs for m in order],
                                  [frames[m].rest_mass for m in order],
                                  np.array([self.weights[m] for m in order]),
                                  self.engine.vocab_size, self.params.fuse)

    def _rng(self, step: int) -> np.random.Generator | None:
        """Sampling is seeded per step: a new leader draws what the old one would have."""
        p = self.params
        return np.random.default_rng([p.seed or 0, step]) if p.temperature > 0 else None

    def _append(self, step: int, tok: int, text: str) -> tuple[Token, str | None, str]:
        """Commit `tok` at `step`: its text piece (cut at a stop string), its hash, and
        whether it ends the answer. Returns its Token, the finish reason if it is the last
        (else None) and the answer's text so far."""
        p = self.params
        self.tokens.append(tok)
        final, reason = step + 1 >= p.max_tokens, "length"
        if tok in self.engine.eos_ids:
            piece, final, reason = "", True, "eos"
        else:
            self._detok.add_token(tok)
            piece = self._detok.last_segment
        if final:
            piece += held_text(self._detok)
        if piece:
            text += piece
            cut = stop_at(text, len(piece), p.stop)
            if cut is not None:
                piece = piece[: max(len(piece) - (len(text) - cut), 0)]
                text, final, reason = text[:cut], True, "stop"
        if self._cancelled:
            final, reason = True, "cancelled"
        self._hashes.append(self._hash)
        self._hash = extend_hash(self._hash, tok)
        msg = Token(self.session, step, tok, self._hash, piece, final, self.term)
        return msg, reason if final else None, text

    def _learn(self, frames: dict[str, Frame], fused_on: dict[str, Frame], tok: int) -> None:
        if self.params.weights == "online" and frames and len(self.weights) > 1:
            # (a one-member session's weight stays 1: fixed share of one is the identity)
            present = [m for m in self.weights if m in frames]
            pools.online_step(self.weights, present,
                               np.array([earned_logp(frames[m].prev_logp, fused_on.get(m), tok)
                                         for m in present]),
                               eta=ONLINE_ETA, alpha=ONLINE_ALPHA)

    def _initial_weights(self, frames: dict[str, Frame]) -> dict[str, float]:
        return pools.initial_weights(self.params.weights, self.members, frames, PERPLEXITY_TAU)

def earned_logp(claimed: float | None, frame: Frame | None, token: int) -> float:
    """A member's log p of the committed token, as far as its own frame for that step
    backs it: a member cannot earn weight by claiming, after the fact, a probability its
    frame did not give (an honest member's exact value agrees with its float16 frame)."""
    claimed = 0.0 if claimed is None else claimed
    if frame is None:
        return claimed
    def backed(value: float) -> float:      # float16 keeps ~11 bits: allow its rounding
        return value + FRAME_LOGP_SLACK + abs(value) * 2.0 ** -10

    hit = np.nonzero(frame.ids == token)[0]
    if hit.size:
        return max(min(claimed, backed(float(frame.logprobs[hit[0]]))), MIN_LOGP)
    floor = math.log(frame.rest_mass) if frame.rest_mass > 0 else MIN_LOGP
    return max(min(claimed, backed(float(np.min(frame.logprobs))), floor), MIN_LOGP)
