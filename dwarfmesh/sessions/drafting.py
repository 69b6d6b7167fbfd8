"""What a speculative round drafts, and how much: the drafters and auto's cost model.

`PromptLookup` drafts from the text so far, for free. `DraftLength` decides each round's
drafter (prompt lookup, or a member drafting greedily from its own model) and length,
fixed or auto: the one that maximises the expected tokens a round commits per second the
round takes, from the measured acceptance per kind of draft and the members' forward
times (one position, each further position, a member's own forward).

Owns: the drafter's choice of tokens, the cost model, what it measured. Does not: send,
wait or fuse (`speculate.SpecLeaderSession` runs the rounds), or run a model (a member
drafting does, in `Engine.step` with `self_draft`).
"""

from __future__ import annotations

import numpy as np

from dwarfmesh.config import MAX_DRAFT

MIN_NGRAM, MAX_NGRAM = 1, 4
EMA = 0.2               # weight of the newest measurement in the cost estimates
PROBE_EVERY = 64        # auto drafting nothing of a kind: a short draft every this many rounds
PROBE_DRAFT = 2
MEMBER = -1             # the kind of a member's draft (prompt lookup's kinds are 1..MAX_NGRAM)
OPTIMISTIC = 0.95       # acceptance a member's draft would need at best, for auto to try it


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
        self.forward: dict[str, float] = {}    # node id -> its forward over one position (s)
        self.gamma = self.fixed if not self.auto else 0
        if prior is not None:                  # what the same members' last answer learned
            self.t1, self.per_position, self.overhead = (prior.t1, prior.per_position,
                                                         prior.overhead)
            self.walks = {k: list(v) for k, v in prior.walks.items()}
            self.idle = dict(prior.idle)
            self.forward = dict(prior.forward)

    def alpha(self, kind: int = 0) -> float:
        tried, took = self.walks.get(kind, (0, 0))
        return (took + 1) / (tried + 2)        # Laplace's rule: 0.5 before any

    def next(self, kind: int = 0) -> int:
        """The draft length for the next round, whose draft is of `kind` (prompt lookup)."""
        return self.plan(kind, None)[1]

    def rate(self, a: float, g: int, draft_s: float = 0.0, hops: int = 1) -> float:
        """Expected tokens per second of a round drafting `g` tokens each accepted with
        probability `a`, when drafting takes `draft_s` first and the round `hops` network
        round trips (a member drafting: one to ask it, one to verify)."""
        a = min(a, 0.999)
        return ((1 - a ** (g + 1)) / (1 - a)
                / (self.overhead * hops + draft_s + self.t1 + self.per_position * g))

    def plan(self, kind: int | None, member: tuple[float, int] | None,
             only_member: bool = False) -> tuple[str, int]:
        """The next round's drafter and length: ("lookup", g) for a prompt-lookup draft of
        `kind` (None: prompt lookup has none), ("member", g) for the member drafter, whose
        forward over one position takes member[0] seconds, asked over member[1] network
        round trips (0 when it is this node); None: no member may draft. Fixed lengths
        draft by prompt lookup unless `only_member`; auto takes what the cost model says
        pays most, and tries a drafter it has not chosen in PROBE_EVERY rounds with a
        short draft (the member only where its forward is cheap enough that it could)."""
        if not self.auto:
            choice = ("member", self.fixed) if only_member else ("lookup", self.fixed)
        elif self.t1 is None:                # measure a forward over one position, then
            choice = ("lookup", 0)
        elif self.per_position is None:      # ... over a few
            choice = (("member", PROBE_DRAFT) if only_member and member else
                      ("lookup", PROBE_DRAFT) if kind is not None else ("lookup", 0))
        else:
            choice = self._best(kind, member, only_member)
        source, g = choice
        for k in ([kind] if kind is not None else []) + ([MEMBER] if member else []):
            chosen = g and ((source == "member") == (k == MEMBER))
            self.idle[k] = 0 if chosen else self.idle.get(k, 0) + 1
        self.gamma = g
        return choice

    def _best(self, kind: int | None, member: tuple[float, int] | None,
              only_member: bool) -> tuple[str, int]:
        plain = self.rate(0.0, 0)
        # (rate, choice) in order of preference on a tie: plain, prompt lookup, member
        options = [(plain, ("lookup", 0))]
        if kind is not None and not only_member:
            a = self.alpha(kind)
            options += [(self.rate(a, g), ("lookup", g)) for g in range(1, MAX_DRAFT + 1)]
        if member is not None:
            t_draft, hops = member

            def member_rate(a: float, g: int) -> float:
                return self.rate(a, g, (g + 1) * t_draft, 1 + hops)
            a = self.alpha(MEMBER)
            options += [(member_rate(a, g), ("member", g)) for g in range(1, MAX_DRAFT + 1)]
        choice = max(options, key=lambda option: option[0])[1]   # the first best
        if member is not None:
            if (choice[1] == 0 and self.idle.get(MEMBER, 0) >= PROBE_EVERY
                    and member_rate(OPTIMISTIC, PROBE_DRAFT) > plain):
                return "member", PROBE_DRAFT
        if (choice[1] == 0 and kind is not None and not only_member
                and self.idle.get(kind, 0) >= PROBE_EVERY):
            return "lookup", PROBE_DRAFT
        return choice

    def walked(self, took: int, rejected: bool, kind: int = 0) -> None:
        """A round's walk accepted `took` drafted tokens of a draft of `kind`, and ended at
        a drafted token the fused choice rejected (`rejected`) or not (the draft ran
        out, or the answer did)."""
        walk = self.walks.setdefault(kind, [0, 0])
        walk[0] += took + int(rejected)
        walk[1] += took

    def timed_member(self, node_id: str, forward_s: float) -> None:
        """`node_id`'s forward over one position took `forward_s`."""
        self.forward[node_id] = _ema(self.forward.get(node_id), forward_s)

    def timed(self, drafted: int, round_s: float, forward_s: float) -> None:
        """A round that sent `drafted` tokens took `round_s`, its slowest member's forward
        `forward_s` (a member's draft: the round after the draft was in)."""
        self.overhead = _ema(self.overhead, max(round_s - forward_s, 0.0))
        if drafted == 0:
            self.t1 = _ema(self.t1, forward_s)
        elif self.t1 is not None:
            self.per_position = _ema(self.per_position,
                                     max(forward_s - self.t1, 0.0) / drafted)


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - EMA) * old + EMA * new
