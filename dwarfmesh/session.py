"""One ensemble session: the leader's decode loop, and a member's side of it.

The life of one token (the leader's loop, `LeaderSession.run`):

1. The leader has every member's frame for step s (top-k ids + float16 log-probs, the
   rest mass, the exact log p of the token committed at s-1). Frames whose prefix hash
   does not match the leader's committed prefix are dropped (that member diverged).
2. `fusion.fuse` pools them under the current weights; `fusion.choose` picks the token.
3. The leader sends `Token(s, id, hash)` to every remote member and to the origin node
   (which streams the text to the client), *then* computes its own next frame locally,
   so its forward runs while the members compute theirs.
4. Members append the token to their KV cache and answer with the frame for step s+1;
   online weights learn from each frame's `prev_logp`.

A member that does not answer within the step timeout, or that the node declares dead,
is dropped from the session and the answer goes on with the others. The session knows
the node only through the callables it is given (send, engine), so tests can drive it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from dwarfmesh import fusion
from dwarfmesh.config import (ONLINE_ALPHA, ONLINE_ETA, PERPLEXITY_TAU, PREFILL_TIMEOUT_S,
                              STEP_TIMEOUT_S)
from dwarfmesh.membership import Member
from dwarfmesh.protocol import (End, Frame, GenParams, Leave, Open, Token, extend_hash,
                                prefix_hash)

log = logging.getLogger(__name__)

Send = Callable[[str, Any], int]     # (node_id, message) -> bytes sent


@dataclass
class _StepStats:
    step_ms: list[float] = field(default_factory=list)
    slowest_forward_ms: list[float] = field(default_factory=list)
    fusion_ms: list[float] = field(default_factory=list)


class LeaderSession:
    """Runs one answer as decode leader over `members` (this node may be one of them)."""

    def __init__(self, *, session: str, origin: str, prompt: str, params: GenParams,
                 members: list[Member], me: Member, engine: Any, send: Send,
                 messages: list[dict[str, Any]] | None = None, keep: bool = False,
                 excluded: list[tuple[Member, str]] | None = None,
                 step_timeout_s: float = STEP_TIMEOUT_S) -> None:
        self.session, self.origin, self.prompt, self.params = session, origin, prompt, params
        self.messages, self.keep = messages or [], keep
        self.members = list(members)
        self.me, self.engine, self.send = me, engine, send
        self.excluded = excluded or []
        self.step_timeout_s = step_timeout_s
        self._expect_step = -1
        self._frames: dict[str, Any] = {}
        self._waiter: asyncio.Future | None = None
        self._hash = 0
        self.wire_bytes = 0
        self.frame_bytes = 0
        self.frames_dropped = 0
        self._cancelled = False

    # --- inputs from the node -------------------------------------------------------------

    def on_frame(self, frame: Frame, size: int) -> None:
        if frame.step != self._expect_step or frame.sender not in self._pending_ids():
            self.frames_dropped += 1
            return
        if frame.prefix_hash != self._hash:
            log.warning("session %s: %s diverged at step %d; leaving it out", self.session,
                        frame.sender, frame.step)
            self.frames_dropped += 1
            self.member_lost(frame.sender)
            return
        self.wire_bytes += size
        self.frame_bytes += size
        self._frames[frame.sender] = frame
        self._maybe_done()

    def member_lost(self, node_id: str) -> None:
        """The node says this member is gone: stop waiting for it."""
        if any(m.node_id == node_id for m in self.members) and node_id != self.me.node_id:
            self.members = [m for m in self.members if m.node_id != node_id]
            log.warning("session %s: member %s left; %d remain", self.session, node_id,
                        len(self.members))
            self._maybe_done()

    def cancel(self) -> None:
        self._cancelled = True

    def _pending_ids(self) -> set[str]:
        return {m.node_id for m in self.members}

    def _maybe_done(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            if self._pending_ids() <= set(self._frames):
                self._waiter.set_result(None)

    # --- the loop -------------------------------------------------------------------------

    async def _gather(self, step: int, send_first: Callable[[], None], local) -> dict[str, Any]:
        """Expect frames for `step`, send what triggers them, add the local frame, wait."""
        self._expect_step, self._frames = step, {}
        self._waiter = asyncio.get_running_loop().create_future()
        send_first()
        if local is not None:
            self._frames[self.me.node_id] = await local
            self._maybe_done()
        timeout = PREFILL_TIMEOUT_S if step == 0 else self.step_timeout_s
        try:
            await asyncio.wait_for(asyncio.shield(self._waiter), timeout)
        except asyncio.TimeoutError:
            for m in list(self.members):
                if m.node_id not in self._frames:
                    log.warning("session %s: %s sent no frame for step %d in %.0fs; leaving it out",
                                self.session, m.name, step, timeout)
                    self.member_lost(m.node_id)
        return {m.node_id: self._frames[m.node_id] for m in self.members
                if m.node_id in self._frames}

    def _broadcast(self, msg: Any) -> None:
        sent_origin = False
        for m in self.members:
            if m.node_id != self.me.node_id:
                self.wire_bytes += self.send(m.node_id, msg)
                sent_origin |= m.node_id == self.origin
        if not sent_origin:
            self.send(self.origin, msg)

    async def run(self) -> dict[str, Any]:
        """Decode until EOS, a stop string, max_tokens or cancellation; return the summary."""
        p, t_start = self.params, time.perf_counter()
        local_member = any(m.node_id == self.me.node_id for m in self.members)
        prompt_ids = (self.engine.encode_chat(self.messages) if self.messages
                      else self.engine.encode(self.prompt, chat=p.chat))
        self._hash = prefix_hash(prompt_ids)
        open_msg = Open(self.session, self.me.node_id, p.top_k, self.keep,
                        np.asarray(prompt_ids, dtype=np.uint32))
        local = self.engine.open(self.session, prompt_ids, p.top_k) if local_member else None
        frames = await self._gather(0, lambda: self._broadcast_open(open_msg), local)
        t_first = time.perf_counter()
        local_first = frames.get(self.me.node_id)
        self.prompt_reused = getattr(local_first, "reused", 0)
        order = [m.node_id for m in self.members]
        names = {m.node_id: m.name for m in self.members}
        weights = self._initial_weights(frames)
        rng = np.random.default_rng(p.seed) if p.temperature > 0 else None
        detok = self.engine.detokenizer()
        stats, tokens, text, reason = _StepStats(), [], "", "length"
        agree = {nid: 0 for nid in order}
        disagree_steps = 0
        try:
            for step in range(p.max_tokens):
                if not frames:
                    reason = "error: no member frames"
                    break
                t0 = time.perf_counter()
                ids = [m for m in order if m in frames]
                w = np.array([weights[m] for m in ids])
                fused = fusion.fuse([frames[m].ids for m in ids],
                                    [frames[m].logprobs for m in ids],
                                    [frames[m].rest_mass for m in ids], w,
                                    self.engine.vocab_size, p.fuse)
                tok = fusion.choose(fused, temperature=p.temperature, top_p=p.top_p, rng=rng)
                stats.fusion_ms.append((time.perf_counter() - t0) * 1000.0)
                for m, top in zip(ids, fused.member_top):
                    agree[m] += int(top == tok)
                disagree_steps += int(np.any(fused.member_top != tok))
                tokens.append(tok)
                final = step + 1 >= p.max_tokens or self._cancelled
                if tok in self.engine.eos_ids:
                    piece, final, reason = "", True, "eos"
                else:
                    detok.add_token(tok)
                    piece = detok.last_segment
                    text += piece
                    hit = next((s for s in p.stop if s and s in text), None)
                    if hit is not None:
                        cut = text.index(hit)
                        piece = piece[: max(len(piece) - (len(text) - cut), 0)]
                        text, final, reason = text[:cut], True, "stop"
                if self._cancelled:
                    reason = "cancelled"
                self._hash = extend_hash(self._hash, tok)
                token_msg = Token(self.session, step, tok, self._hash, piece, final)
                if final:
                    self._broadcast(token_msg)
                    break
                t_step = time.perf_counter()
                local = self.engine.step(self.session, tok, p.top_k) if local_member else None
                frames = await self._gather(step + 1, lambda: self._broadcast(token_msg), local)
                stats.step_ms.append((time.perf_counter() - t_step) * 1000.0)
                if frames:
                    stats.slowest_forward_ms.append(max(f.forward_ms for f in frames.values()))
                if p.weights == "online" and frames:
                    present = [m for m in order if m in frames]
                    ow = fusion.OnlineWeights(np.array([weights[m] for m in present]),
                                              eta=ONLINE_ETA, alpha=ONLINE_ALPHA)
                    neww = ow.update(np.array([frames[m].prev_logp for m in present]))
                    weights.update(zip(present, neww))
                order = [m for m in order if m in self._pending_ids()]
        finally:
            if local_member:
                await self.engine.close(self.session, keep=self.keep)
        t_end = time.perf_counter()
        n = len(tokens)
        decode_s = t_end - t_first
        remote = max(len([m for m in self.members if m.node_id != self.me.node_id]), 1)
        summary = {
            "text": text,
            "token_ids": tokens,
            "finish_reason": reason,
            "leader": self.me.name,
            "members": [names[m] for m in order],
            "models": {names[m]: next(x.model for x in self.members if x.node_id == m)
                       for m in order},
            "excluded": [{"name": m.name, "reason": why} for m, why in self.excluded],
            "prompt_tokens": len(prompt_ids),
            "prompt_tokens_reused": self.prompt_reused,   # the leader's own KV cache reuse
            "steps": n,
            "ttft_ms": (t_first - t_start) * 1000.0,
            "tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            "wire_bytes_per_token": self.wire_bytes / max(n, 1),
            "frame_bytes_per_member_per_token": self.frame_bytes / max(n, 1) / remote,
            "disagreement_rate": disagree_steps / max(n, 1),
            "agreement": {names[m]: agree[m] / max(n, 1) for m in agree if m in names},
            "weights": {names[m]: float(weights[m]) for m in order},
            "frames_dropped": self.frames_dropped,
            "timing_ms": _timing(stats),
        }
        self._broadcast(End(self.session, reason, summary))
        return summary

    def _broadcast_open(self, msg: Open) -> None:
        for m in self.members:
            if m.node_id != self.me.node_id:
                self.wire_bytes += self.send(m.node_id, msg)

    def _initial_weights(self, frames: dict[str, Any]) -> dict[str, float]:
        ids = [m.node_id for m in self.members]
        mode = self.params.weights
        if mode == "static":
            w = np.array([m.weight for m in self.members], dtype=np.float64)
        elif mode in ("perplexity", "online"):
            w = fusion.perplexity_weights(
                [getattr(frames.get(i), "prompt_nll", None) for i in ids], PERPLEXITY_TAU)
        else:
            w = np.ones(len(ids))
        w = w / w.sum()
        return dict(zip(ids, map(float, w)))


def _timing(stats: _StepStats) -> dict[str, float]:
    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(xs, q)) if xs else 0.0
    step = np.array(stats.step_ms) if stats.step_ms else np.zeros(0)
    slow = np.array(stats.slowest_forward_ms[: len(step)]) if stats.step_ms else np.zeros(0)
    overhead = step - slow if len(slow) == len(step) else np.zeros(0)
    return {
        "step_p50": pct(stats.step_ms, 50),
        "step_p95": pct(stats.step_ms, 95),
        "slowest_forward_p50": pct(stats.slowest_forward_ms, 50),
        "fusion_p50": pct(stats.fusion_ms, 50),
        "overhead_p50": float(np.median(overhead)) if len(overhead) else 0.0,
        "overhead_share": float(np.median(overhead) / np.median(slow))
        if len(overhead) and np.median(slow) > 0 else 0.0,
    }


class MemberSession:
    """A member's side: prefill on Open, one step per Token, free on End."""

    def __init__(self, *, session: str, leader: str, me: str, engine: Any, send: Send,
                 top_k: int, keep: bool = False) -> None:
        self.session, self.leader, self.me = session, leader, me
        self.engine, self.send, self.top_k, self.keep = engine, send, top_k, keep
        self._hash = 0
        self._lock = asyncio.Lock()
        self.closed = False

    def _frame(self, step: int, out: Any) -> Frame:
        return Frame(self.session, step, self.me, self._hash, out.rest_mass, out.prev_logp,
                     out.prompt_nll, out.forward_ms, out.ids, out.logprobs)

    async def open(self, prompt_ids: np.ndarray) -> None:
        async with self._lock:
            self._hash = prefix_hash(prompt_ids)
            try:
                out = await self.engine.open(self.session, prompt_ids, self.top_k)
            except (RuntimeError, ValueError) as exc:   # EngineBusy, a bad prompt
                self._leave(str(exc))
                return
            self.send(self.leader, self._frame(0, out))

    def _leave(self, reason: str) -> None:
        log.warning("session %s: leaving: %s", self.session, reason)
        self.closed = True
        self.send(self.leader, Leave(self.session, self.me, reason))

    async def token(self, msg: Token) -> None:
        async with self._lock:
            if self.closed:
                return
            expected = extend_hash(self._hash, msg.token_id)
            if msg.prefix_hash != expected:
                self.keep = False
                await self._close()
                self._leave(f"committed prefix diverged at step {msg.step}")
                return
            self._hash = expected
            if msg.final:
                await self._close()
                return
            out = await self.engine.step(self.session, msg.token_id, self.top_k)
            self.send(self.leader, self._frame(msg.step + 1, out))

    async def end(self) -> None:
        async with self._lock:
            await self._close()

    async def _close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.engine.close(self.session, keep=self.keep)
