"""Speculative decoding across the mesh: the id-fusion loop, several tokens a round.

A plain id session pays one network round and one forward of its slowest member per
token. Decoding is memory-bound, so a forward over a few positions costs little more than
over one. A speculative round (`SpecLeaderSession._decode`):

1. The leader holds every member's `DraftFrame` for step s: the frame at s, and the frame
   after each token of the draft d_1..d_n it sent with the round before.
2. It walks the positions: fuses position i exactly as the plain loop would (the same
   frames, the online weights updated token by token from each drafted token's exact
   log p), and keeps d_i while the fused choice is d_i (`fusion.verify_draft`: greedy
   is identical token for token; sampling keeps the plain loop's distribution).
3. At the first position where the fused choice differs (or past the draft) it commits
   that choice: the round commits the accepted draft plus one token, at least one.
4. It drafts the next tokens (`PromptLookup`: the longest recent n-gram of the prompt
   and answer seen before, continued as it went on then; no model runs) and sends every
   member one `Tokens` message: the round's tokens and the next draft. Each member
   appends both in one forward (`Engine.step` with a draft keeps the drafted ids it
   commits and trims the rest) and answers one `DraftFrame`.

Failover, deadlines, late and lost members work as in `session.py` (this is a subclass):
a round reaches a member whole or not at all, and a leader taking over adopts a round
that reached only some from their frames' `round_ids`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from dwarfmesh import fusion
from dwarfmesh.config import MAX_DRAFT
from dwarfmesh.member import make_frame
from dwarfmesh.protocol import DraftFrame, Frame, Token, Tokens
from dwarfmesh.session import LeaderSession

AUTO_START = 4          # drafted tokens a round under --speculate auto, at first
MIN_NGRAM, MAX_NGRAM = 1, 4


class PromptLookup:
    """Drafts by prompt lookup (Saxena 2023, "Prompt Lookup Decoding"): the longest
    suffix of the text so far (MAX_NGRAM ids down to MIN_NGRAM) that occurred before, and
    what followed its latest earlier occurrence. Free to compute, and strong where
    answers repeat their context (code: names, signatures, indentation).

    With `gamma` < 0 (auto), the draft length adapts to what the members accept: one
    more after a round that took the whole draft, one less (down to 1) after a round
    that took none of it."""

    name = "prompt-lookup"

    def __init__(self, gamma: int) -> None:
        self.auto = gamma < 0
        self.gamma = AUTO_START if self.auto else min(gamma, MAX_DRAFT)

    def draft(self, ids: list[int], limit: int) -> list[int]:
        n_max = min(self.gamma, limit)
        if n_max <= 0:
            return []
        arr = np.asarray(ids, dtype=np.int64)
        for n in range(min(MAX_NGRAM, len(arr) - 1), MIN_NGRAM - 1, -1):
            tail = arr[-n:]
            # every earlier start of the n-gram (not the suffix itself), latest first
            windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
            hits = np.nonzero((windows == tail).all(axis=1))[0]
            if hits.size:
                start = int(hits[-1]) + n
                return [int(t) for t in arr[start:start + n_max]]
        return []

    def accepted(self, drafted: int, took: int) -> None:
        if not self.auto or not drafted:
            return
        if took == drafted:
            self.gamma = min(self.gamma + 1, MAX_DRAFT)
        elif took == 0:
            self.gamma = max(self.gamma - 1, 1)


class SpecLeaderSession(LeaderSession):
    """`LeaderSession` committing several tokens a round (see the module docstring)."""

    AHEAD = MAX_DRAFT + 1          # a member may hold a whole round the new leader lacks

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.drafter = PromptLookup(self.params.speculate)
        self._draft: list[int] = []        # the draft the current frames were computed on
        self._round: list[int] = []        # the tokens the last round committed
        self.rounds = self.drafted = self.accepted = 0

    def _own(self, step: int, out: Any) -> Frame:
        last = self.tokens[-1] if self.tokens else -1
        return make_frame(out, self.session, step, self.me.node_id, self._hash, last,
                          self._round)

    def _ahead_ids(self, frame: Frame, n: int) -> list[int]:
        if isinstance(frame, DraftFrame) and 0 < n <= len(frame.round_ids):
            return [int(t) for t in frame.round_ids[len(frame.round_ids) - n:]]
        return super()._ahead_ids(frame, n)

    def positions(self, frame: Frame) -> list[Frame]:
        """A member's frames for this round's positions: the one at its step, then the one
        after each drafted token, as plain Frames (what the plain loop would have got had
        the draft been committed). Only the positions of this round's own draft."""
        out = [frame]
        if not isinstance(frame, DraftFrame) or not self._draft:
            return out
        n = min(len(frame.more_rest), len(self._draft))
        if [int(t) for t in frame.draft[:n]] != self._draft[:n]:
            return out
        k = len(frame.ids)
        for i in range(n):
            out.append(Frame(frame.session, frame.step + i + 1, frame.sender, 0,
                             float(frame.more_rest[i]), float(frame.draft_logp[i]),
                             self._draft[i], None, frame.forward_ms,
                             frame.more_ids[i * k:(i + 1) * k],
                             frame.more_logprobs[i * k:(i + 1) * k]))
        return out

    async def _decode(self, committed: list[int], frames: dict[str, Frame]) -> tuple[str, str]:
        p = self.params
        self.tokens = list(committed)
        self.weights = self._initial_weights(frames)
        text = self._replay_committed(committed)
        prompt = [int(t) for t in self.prompt_ids]
        step = len(committed)
        while step < p.max_tokens:
            if self.deposed is not None:
                return "deposed", text
            if not frames:
                return "error: no member frames", text
            views = {m: self.positions(f) for m, f in frames.items()}
            depth = min(len(v) for v in views.values())
            msgs: list[Token] = []
            reason = None
            prev: dict[str, Frame] = {}
            cur: dict[str, Frame] = {}
            took = 0                          # drafted tokens this round accepted
            for i in range(depth):
                cur = {m: v[i] for m, v in views.items()}
                if i:                         # the drafted token accepted at i-1 teaches
                    self._learn(cur, prev, msgs[-1].token_id)
                t0 = time.perf_counter()
                order, fused = self._fuse(cur)
                rng = self._rng(step)
                tok = (fusion.verify_draft(fused, self._draft[i], temperature=p.temperature,
                                           top_p=p.top_p, rng=rng)
                       if i < len(self._draft) else
                       fusion.choose(fused, temperature=p.temperature, top_p=p.top_p, rng=rng))
                self.stats.fused(order, fused.member_top, tok, time.perf_counter() - t0)
                msg, reason, text = self._append(step, tok, text)
                msgs.append(msg)
                step += 1
                if i >= len(self._draft) or tok != self._draft[i]:
                    break
                took += 1
                if reason is not None:
                    break
                prev = cur
            self._count(took)
            ids = [m.token_id for m in msgs]
            self._round = ids
            draft = ([] if reason is not None
                     else self.drafter.draft(prompt + self.tokens, p.max_tokens - step - 1))
            round_msg = Tokens(self.session, msgs[0].step, self._hash, [m.text for m in msgs],
                               reason is not None, self.term, np.asarray(ids, np.uint32),
                               np.asarray(draft, np.uint32))
            if reason is not None:
                self._send_round(round_msg, msgs, None)
                return reason, text
            self._draft = draft
            t_step = time.perf_counter()
            local = self.engine.step(self.session, ids, p.top_k, draft)
            frames = await self._gather(step, lambda only, r=round_msg, m=msgs:
                                        self._send_round(r, m, only), local)
            self.stats.stepped(time.perf_counter() - t_step, frames)
            self._learn(frames, cur, ids[-1])
        return "length", text

    def _count(self, took: int) -> None:
        self.rounds += 1
        self.drafted += len(self._draft)
        self.accepted += took
        self.drafter.accepted(len(self._draft), took)

    def _send_round(self, round_msg: Tokens, msgs: list[Token], only: set[str] | None) -> None:
        """The round to the remote members (or those in `only`) as one `Tokens`, then its
        tokens one by one to the origin when it is not a member (members first, so an
        origin never shows a token that no surviving member holds)."""
        sent = set()
        for m in self.members:
            if m.node_id != self.me.node_id and (only is None or m.node_id in only):
                self.stats.wire_bytes += self.send(m.node_id, round_msg)
                sent.add(m.node_id)
        for msg in msgs:
            if msg.step == len(self.sent):
                self.sent.append(msg)
        if self.origin not in sent and (only is None or self.origin in only):
            for msg in msgs:
                self.send(self.origin, msg)

    def summary_extra(self) -> dict[str, Any]:
        return {"speculate": {
            "drafter": self.drafter.name, "auto": self.drafter.auto,
            "gamma": self.drafter.gamma, "rounds": self.rounds, "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance": self.accepted / self.drafted if self.drafted else 0.0,
            "tokens_per_round": len(self.tokens) / max(self.rounds, 1)}}
