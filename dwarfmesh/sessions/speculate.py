"""Speculative decoding across the mesh: the id-fusion loop, several tokens a round.

A plain id session pays one network round and one forward of its slowest member per
token. Decoding is memory-bound, so a forward over a few positions costs little more than
over one. A speculative round (`SpecLeaderSession._decode`):

1. The leader holds every member's `DraftFrame` for step s: the frame at s, and the frame
   after each token of the draft d_1..d_n it sent with the round before.
2. It walks the positions: fuses position i exactly as the plain loop would (the same
   frames, the online weights updated token by token from each drafted token's exact
   log p), and keeps d_i while the fused choice is d_i (`pools.verify_draft`: greedy
   is identical token for token; sampling keeps the plain loop's distribution).
3. At the first position where the fused choice differs (or past the draft) it commits
   that choice: the round commits the accepted draft plus one token, at least one.
4. It drafts the next tokens (`PromptLookup`: the longest recent n-gram of the prompt
   and answer seen before, continued as it went on then; no model runs), as many as
   `DraftLength` says (fixed, or auto: what pays, given the measured acceptance and
   the members' forward times over one position and over several), and sends every
   member one `Tokens` message: the round's tokens and the next draft. Each member
   appends both in one forward (`Engine.step` with a draft keeps the drafted ids it
   commits and trims the rest) and answers one `DraftFrame`.

Failover, deadlines, late and lost members work as in `leader.py` (this is a subclass):
a round reaches a member whole or not at all, and a leader taking over adopts a round
that reached only some from their frames' `round_ids`.

Owns: the drafter, the choice of a round's length, the speculative round's walk. Does
not: fuse or choose (the plain loop's `_fuse`/`_rng`/`_append`, `fusion.pools`), or
compute anything on a model (members do, in `Engine.step` with a draft).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from dwarfmesh.config import MAX_DRAFT
from dwarfmesh.fusion import pools
from dwarfmesh.sessions.leader import LeaderSession
from dwarfmesh.sessions.member import make_frame
from dwarfmesh.wire.protocol import DraftFrame, Frame, Token, Tokens

MIN_NGRAM, MAX_NGRAM = 1, 4
EMA = 0.2               # weight of the newest measurement in the cost estimates
PROBE_EVERY = 64        # auto drafting nothing of a kind: a short draft every this many rounds
PROBE_DRAFT = 2
MEMORY_KEPT = 64        # sets of members whose measurements a node keeps between answers


class PromptLookup:
    """Drafts by prompt lookup (Saxena 2023, "Prompt Lookup Decoding"): the longest
    suffix of the text so far (MAX_NGRAM ids down to MIN_NGRAM) that occurred before, and
    what followed its latest earlier occurrence. Free to compute, and strong where
    answers repeat their context (code: names, signatures, indentation)."""

    name = "prompt-lookup"

    def match(self, ids: list[int] | np.ndarray) -> tuple[int, list[int]]:
        """The length of the longest suffix of `ids` seen before, and what followed its
        latest earlier occurrence (at most MAX_DRAFT ids); (0, []) when none."""
        arr = np.asarray(ids, dtype=np.int64)       # (an int64 array is used as it is)
        for n in range(min(MAX_NGRAM, len(arr) - 1), MIN_NGRAM - 1, -1):
            tail = arr[-n:]
            # every earlier start of the n-gram (not the suffix itself), latest first
            windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)
            hits = np.nonzero((windows == tail).all(axis=1))[0]
            if hits.size:
                start = int(hits[-1]) + n
                return n, [int(t) for t in arr[start:start + MAX_DRAFT]]
        return 0, []

    def draft(self, ids: list[int], n_max: int) -> list[int]:
        return self.match(ids)[1][:max(n_max, 0)]


class DraftLength:
    """How many tokens a round drafts: `gamma` as asked, or (auto) the length that
    maximises the expected tokens a round commits per second the round takes.

    A drafted token is accepted with probability `alpha` (estimated from the rounds so
    far, geometric model: a round's walk accepts drafted tokens until the first that the
    fused choice rejects), so a round drafting g tokens commits (1 - alpha^(g+1)) /
    (1 - alpha) tokens on average. `alpha` is kept per kind of draft (for prompt lookup:
    the length of the n-gram it matched; a 4-gram's continuation is right far more often
    than a 1-gram's). A round takes the round's overhead (network, leader) plus its
    slowest member's forward over the positions: t1 for one, plus `per_position` for each
    drafted one, measured from the members' own forward times. Where a forward over
    several positions costs about as much as over one (a GPU, or float32 on a CPU) auto
    drafts long; where it costs several times more (llama.cpp's quantized kernels on a
    CPU) it drafts only what is nearly always right, and probes the rest now and then
    with a short draft."""

    def __init__(self, gamma: int, prior: DraftLength | None = None) -> None:
        self.auto = gamma < 0
        self.fixed = min(gamma, MAX_DRAFT)
        self.walks: dict[int, list[int]] = {}  # kind -> [positions walked, accepted]
        self.idle: dict[int, int] = {}         # kind -> rounds since auto drafted it
        self.t1: float | None = None           # slowest forward over one position (s)
        self.per_position: float | None = None  # ... and each further position (s)
        self.overhead = 0.0                    # round time beyond the slowest forward (s)
        self.gamma = self.fixed if not self.auto else 0
        if prior is not None:                  # what the same members' last answer learned
            self.t1, self.per_position, self.overhead = (prior.t1, prior.per_position,
                                                         prior.overhead)
            self.walks = {k: list(v) for k, v in prior.walks.items()}
            self.idle = dict(prior.idle)

    def alpha(self, kind: int = 0) -> float:
        tried, took = self.walks.get(kind, (0, 0))
        return (took + 1) / (tried + 2)        # Laplace's rule: 0.5 before any

    def next(self, kind: int = 0) -> int:
        """The draft length for the next round, whose draft is of `kind`."""
        if not self.auto:
            return self.fixed
        if self.t1 is None:
            g = 0                            # measure a forward over one position, then
        elif self.per_position is None:
            g = PROBE_DRAFT                  # ... over a few
        else:
            a = min(self.alpha(kind), 0.999)
            t1, per, over = self.t1, self.per_position, self.overhead

            def rate(g: int) -> float:
                return (1 - a ** (g + 1)) / (1 - a) / (over + t1 + per * g)
            g = max(range(MAX_DRAFT + 1), key=rate)
            if g == 0 and self.idle.get(kind, 0) >= PROBE_EVERY:
                g = PROBE_DRAFT
        self.idle[kind] = 0 if g else self.idle.get(kind, 0) + 1
        self.gamma = g
        return g

    def walked(self, took: int, rejected: bool, kind: int = 0) -> None:
        """A round's walk accepted `took` drafted tokens of a draft of `kind`, and ended at
        a drafted token the fused choice rejected (`rejected`) or not (the draft ran
        out, or the answer did)."""
        walk = self.walks.setdefault(kind, [0, 0])
        walk[0] += took + int(rejected)
        walk[1] += took

    def timed(self, drafted: int, round_s: float, forward_s: float) -> None:
        """A round that sent `drafted` tokens took `round_s`, its slowest member's forward
        `forward_s`."""
        self.overhead = _ema(self.overhead, max(round_s - forward_s, 0.0))
        if drafted == 0:
            self.t1 = _ema(self.t1, forward_s)
        elif self.t1 is not None:
            self.per_position = _ema(self.per_position,
                                     max(forward_s - self.t1, 0.0) / drafted)


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new


class SpecLeaderSession(LeaderSession):
    """`LeaderSession` committing several tokens a round (see the module docstring)."""

    AHEAD = MAX_DRAFT + 1          # a member may hold a whole round the new leader lacks

    def __init__(self, *, memory: dict[frozenset[str], DraftLength] | None = None,
                 **kw: Any) -> None:
        """`memory`: the node's last `DraftLength` per set of members, so that an answer
        starts from what the one before it measured instead of measuring again."""
        super().__init__(**kw)
        self.drafter = PromptLookup()
        self._memory = memory
        self._key = frozenset(m.node_id for m in self.members)
        prior = memory.get(self._key) if memory is not None else None
        self.length = DraftLength(self.params.speculate, prior)
        self._draft: list[int] = []        # the draft the current frames were computed on
        self._kind = 0                     # ... and its kind (the n-gram length it matched)
        self._round_ids: list[int] = []    # the tokens the last round committed
        self.rounds = self.drafted = self.accepted = 0

    async def run(self) -> dict[str, Any]:
        try:
            return await super().run()
        finally:
            if self._memory is not None and self.length.t1 is not None:
                self._memory.pop(self._key, None)
                self._memory[self._key] = self.length
                while len(self._memory) > MEMORY_KEPT:
                    self._memory.pop(next(iter(self._memory)))

    def _own(self, step: int, out: Any) -> Frame:
        last = self.tokens[-1] if self.tokens else -1
        return make_frame(out, self.session, step, self.me.node_id, self._hash, last,
                          self._round_ids)

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
        text = self._begin(committed, frames)
        # Prompt and answer ids in one preallocated buffer that prompt lookup reads as it
        # is: no list copied into an array every round.
        history = np.empty(len(self.prompt_ids) + p.max_tokens, dtype=np.int64)
        held = len(self.prompt_ids) + len(self.tokens)
        history[:held] = [*map(int, self.prompt_ids), *self.tokens]
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
            rejected = False                  # ... and the walk ended at one it rejected
            for i in range(depth):
                cur = {m: v[i] for m, v in views.items()}
                if i:                         # the drafted token accepted at i-1 teaches
                    self._learn(cur, prev, msgs[-1].token_id)
                t0 = time.perf_counter()
                order, fused = self._fuse(cur)
                rng = self._rng(step)
                tok = (pools.verify_draft(fused, self._draft[i], temperature=p.temperature,
                                           top_p=p.top_p, rng=rng)
                       if i < len(self._draft) else
                       pools.choose(fused, temperature=p.temperature, top_p=p.top_p, rng=rng))
                self.stats.fused(order, fused.member_top, tok, time.perf_counter() - t0)
                msg, reason, text = self._append(step, tok, text)
                msgs.append(msg)
                step += 1
                if i >= len(self._draft) or tok != self._draft[i]:
                    rejected = i < len(self._draft)
                    break
                took += 1
                if reason is not None:
                    break
                prev = cur
            self._count(took, rejected)
            ids = [m.token_id for m in msgs]
            self._round_ids = ids
            history[held:held + len(ids)] = ids
            held += len(ids)
            kind, draft = (0, []) if reason is not None else self.drafter.match(
                history[:held])
            if draft:
                draft = draft[:min(self.length.next(kind), p.max_tokens - step - 1)]
            round_msg = Tokens(self.session, msgs[0].step, self._hash, [m.text for m in msgs],
                               reason is not None, self.term, np.asarray(ids, np.uint32),
                               np.asarray(draft, np.uint32))
            if reason is not None:
                self._send_round(round_msg, msgs, None)
                return reason, text
            self._draft, self._kind = draft, kind
            t_step = time.perf_counter()
            local = self.engine.step(self.session, ids, p.top_k, draft)
            frames = await self._gather(step, lambda only, r=round_msg, m=msgs:
                                        self._send_round(r, m, only), local)
            round_s = time.perf_counter() - t_step
            self.stats.stepped(round_s, frames)
            if frames:
                self.length.timed(len(draft), round_s,
                                  max(f.forward_ms for f in frames.values()) / 1000.0)
            self._learn(frames, cur, ids[-1])
        return "length", text

    def _count(self, took: int, rejected: bool) -> None:
        self.rounds += 1
        self.drafted += len(self._draft)
        self.accepted += took
        self.length.walked(took, rejected, self._kind)

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
        length = self.length
        return {"speculate": {
            "drafter": self.drafter.name, "auto": length.auto, "gamma_last": length.gamma,
            "rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
            "acceptance": self.accepted / self.drafted if self.drafted else 0.0,
            "tokens_per_round": len(self.tokens) / max(self.rounds, 1),
            "forward_ms_one_position": None if length.t1 is None else length.t1 * 1000.0,
            "forward_ms_per_drafted_position": (None if length.per_position is None
                                                else length.per_position * 1000.0)}}
