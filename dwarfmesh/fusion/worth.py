"""Who votes in a session, and which whole answer is kept: the worth policy.

An ensemble is worth running only if it is never worse than its best member. Two rules,
pure functions over numbers a session already has:

- **Gate** (`gate`): every member prefills the prompt anyway; its NLL per UTF-8 byte of
  the prompt (bytes, so it compares across tokenizers) says how well it reads this
  input. A member more than `GATE_RATIO` worse than the strongest does not vote in the
  session (it stays in it: it may still draft, and it stands by for failover). This is
  the "determine, then ensemble" rule (UniTE; PackLLM's prompt-perplexity weights).
- **Select** (`select_answer`): whole answers written by the voters, each scored by
  every voting judge; the answer whose *worst* judge finds it most likely per byte
  wins. An answer must convince every voting model: one judge's optimism cannot carry
  a bad answer, and an answer only one member likes (an explanation instead of code, a
  broken function) loses to one that every member finds plausible. Ties go to the
  strongest member's answer.

Claims. A member's prompt NLL is what that member reports, and the gate trusts it: a
lying member that claims to be far the strongest benches the honest members and decides
alone. Nothing here checks a claim (a weak leader that capped others' claims at its own
figure would also keep itself in the vote against honest, stronger members, which is
the case this policy exists for). Bounding a liar's influence is the lying-member
work's (docs/worth.md says what is and is not promised).

Constants are chosen on data that is never reported (the project's own code problems,
`bench/devcode.py`, and fortunes text); see each one's comment.

Owns: the arithmetic of the gate and of selection. Does not: any I/O, any message, or
running a model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# A member whose prompt NLL per byte is more than this much (relative) above the
# strongest member's does not vote. Chosen on the 40 prompts of bench/devcode.py (never
# HumanEval; `bench/worth_dev.py`, bench/results/worth_dev.json): Qwen2.5-Coder-0.5B reads
# them at most 19.9% above the 1.5B (median 9.5%), so it always votes beside it, while
# gemma-3-270m (median 53% above the best) is benched on 39 of 40 and SmolLM2-135M
# (median 64%) on 40 of 40; against the 0.5B alone they are benched on 37 and 39 of 40.
# A member that does vote is still judged by every voter (`select_answer`).
GATE_RATIO = 0.2


@dataclass(frozen=True)
class Gate:
    """Who votes in one session, strongest first, and who was benched and why."""

    voters: tuple[str, ...]
    benched: dict[str, str] = field(default_factory=dict)
    strength: dict[str, float | None] = field(default_factory=dict)   # NLL/byte as counted

    @property
    def anchor(self) -> str:
        return self.voters[0]

    def to_dict(self, names: Mapping[str, str]) -> dict:
        """The summary's view: names, not node ids."""
        return {"voted": [names.get(v, v) for v in self.voters],
                "benched": {names.get(k, k): why for k, why in self.benched.items()},
                "strength_nll_per_byte": {names.get(k, k): (None if v is None
                                                             else round(v, 4))
                                          for k, v in self.strength.items()}}


def gate(strength: Mapping[str, float | None], order: Sequence[str], *,
         ratio: float = GATE_RATIO) -> Gate:
    """Who votes, from each member's prompt NLL per byte (lower is stronger).

    `order` is the session's member order (ties keep it). A member that reported nothing
    (a prompt too short to score, or a figure that is not one) votes but is never the
    anchor while someone reported."""
    counted: dict[str, float | None] = {}
    for m in order:
        v = strength.get(m)
        counted[m] = v if v is not None and math.isfinite(v) and v >= 0.0 else None
    known = [v for v in counted.values() if v is not None]
    if not known:
        return Gate(tuple(order), {}, counted)
    best = min(known)
    voters, benched = [], {}
    for m in order:
        v = counted[m]
        if v is not None and v > best * (1.0 + ratio) + 1e-12:
            benched[m] = (f"prompt NLL {v:.3f} nats/byte, more than {ratio:.0%} above "
                          f"the strongest member's {best:.3f}")
        else:
            voters.append(m)
    voters.sort(key=lambda m: (counted[m] is None, counted[m] or 0.0, order.index(m)))
    return Gate(tuple(voters), benched, counted)


@dataclass(frozen=True)
class Selection:
    """`select_answer`'s verdict."""

    best: int                       # index of the chosen candidate
    worst_per_byte: np.ndarray      # each candidate's worst judge's NLL per unit
    margin: float                   # runner-up's worst minus the winner's (inf: alone)


def select_answer(nll: np.ndarray, units: Sequence[float]) -> Selection:
    """The candidate whose worst judge finds it most likely per unit (byte, plus one for
    an end of text). nll: [judges, candidates], total nats. Ties to the first candidate
    (the caller lists candidates strongest proposer first)."""
    per = np.asarray(nll, dtype=np.float64) / np.maximum(np.asarray(units, np.float64), 1.0)
    per = np.where(np.isfinite(per), per, np.inf)
    worst = per.max(axis=0)
    best = int(np.argmin(worst))
    others = np.delete(worst, best)
    margin = float(others.min() - worst[best]) if len(others) else math.inf
    return Selection(best, worst, margin)
