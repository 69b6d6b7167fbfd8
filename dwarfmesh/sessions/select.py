"""Select mode on the leader: whole answers written in parallel, the most likely kept.

One round instead of one per token or per word:

1. `TextOpen` (mode "select"): every member prefills the prompt and writes its WHOLE
   answer on its own node, with no round trip per token (`TextSessions.propose` with
   `whole`), and sends it as one `Proposal` with its prompt NLL per byte. The leader
   cuts each answer at the first stop string.
2. The worth policy's gate (`fusion.worth.gate`) says who votes: a member far weaker on
   this prompt than the strongest neither writes a candidate nor judges.
3. `Candidates`: the voters' distinct answers, strongest writer first, go to the voters;
   each scores every answer in one pass over its cached prompt (`Scores`).
4. `worth.select_answer` keeps the answer whose worst judge finds it most likely per
   byte; one final `Commit` carries it to the members and the origin.

The summary says who voted, who was benched and why, whose answer won, and by how much.
Failover is the text path's: a new leader restarts the round from the members' state
(`text_resume`), and every member writes its answer again.

Owns: the select round. Does not: write or score text (the members' engines), decide
the rule (`fusion.worth`), or wait for replies (`round`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from dwarfmesh.config import PREFILL_TIMEOUT_S
from dwarfmesh.fusion import text as textfuse
from dwarfmesh.fusion import worth
from dwarfmesh.fusion.textcut import stop_at
from dwarfmesh.wire.modes import Mode
from dwarfmesh.wire.protocol import Candidates, Proposal, Scores

# A member writing a whole answer is silent until it is done (its node's heartbeats say
# it is alive): its bound is the prefill's plus this per token it may write.
SELECT_TOKEN_S = 2.0


class Selecting:
    """The select round of `text_leader.TextLeaderSession` (a mixin: it uses the
    leader's `_gather`, `_commit`, `_to_members`, members and names)."""

    gate: worth.Gate | None = None
    selection: dict[str, Any] | None = None

    def cancel(self: Any) -> None:
        """Stop the answer: while members write, stop waiting for them (the End that
        follows stops their engines)."""
        self._cancelled = True
        if self._round is not None and self.kind is Mode.SELECT:
            self._round.stop()

    async def _select(self: Any, send_open: Callable[[], None], start: int) -> str:
        proposals = await self._gather(
            Proposal, start, send_open, "propose",
            limit=PREFILL_TIMEOUT_S + SELECT_TOKEN_S * self.params.max_tokens)
        if self.deposed is not None:
            return "deposed"
        if self._cancelled:
            return "cancelled"
        self._adopting = False
        order = [m.node_id for m in self.members if m.node_id in proposals]
        if not order:
            return "error: no member answered"
        self.weights = self._initial_weights(proposals)
        self.gate = worth.gate({m: proposals[m].prompt_nll for m in order}, order)
        voters = list(self.gate.voters)
        writers = [m for m in voters if proposals[m].text or proposals[m].eos]
        if not writers:
            return "error: no member proposed an answer"
        answers = [(proposals[m].text, proposals[m].eos) for m in writers]
        cut = [stop_at(t, len(t), self.params.stop) for t, _ in answers]
        answers = [(t if c is None else t[:c], e and c is None)
                   for (t, e), c in zip(answers, cut)]
        cands, index = textfuse.unique_candidates(answers)
        if not cands:          # every answer was a stop string at once: the answer is empty
            commit, _ = self._commit(start, "", False, steps_left=0)
            self._to_members(commit, origin_too=True)
            return "stop"
        judges = voters
        nll = np.zeros((0, len(cands)))
        if len(cands) > 1:
            ask = Candidates(self.session, start, [t for t, _ in cands],
                             [e for _, e in cands], self.term)
            self._n_candidates = len(cands)
            scores = await self._gather(
                Scores, start, lambda only: self._to_members(
                    ask, only=set(voters) if only is None else only & set(voters)),
                "score", among=lambda: [m for m in self._ids() if m in voters])
            if self.deposed is not None:
                return "deposed"
            judges = [m for m in voters if m in scores]
            if not judges:
                return "error: no member scored the answers"
            nll = np.array([scores[m].nll for m in judges], dtype=np.float64)
            chosen = worth.select_answer(nll, [textfuse.units(t, e) for t, e in cands])
        else:
            chosen = worth.Selection(0, np.zeros(1), float("inf"))
        self._record_selection(cands, writers, index, judges, nll, chosen)
        for m, i in zip(writers, index):
            self.agree[m] += int(i == chosen.best)
        self.disagree += int(len(cands) > 1)
        text, eos = cands[chosen.best]
        commit, reason = self._commit(start, text, eos, steps_left=0)
        if reason == "length" and any(c is not None and i == chosen.best
                                      for c, i in zip(cut, index)):
            reason = "stop"
        self._to_members(commit, origin_too=True)
        return reason

    def _record_selection(self: Any, cands: list, writers: list[str], index: list[int],
                          judges: list[str], nll: np.ndarray,
                          chosen: worth.Selection) -> None:
        names = self.names
        units = [textfuse.units(t, e) for t, e in cands]
        self.selection = {
            "chosen_by": [names[m] for m, i in zip(writers, index) if i == chosen.best],
            "margin_nats_per_byte": (None if not np.isfinite(chosen.margin)
                                     else round(chosen.margin, 5)),
            "judges": [names[m] for m in judges],
            "candidates": [
                {"by": [names[m] for m, i in zip(writers, index) if i == c],
                 "bytes": units[c] - int(cands[c][1]),
                 "worst_nll_per_byte": (round(float(chosen.worst_per_byte[c]), 5)
                                        if len(nll) else None),
                 "nll_per_byte": {names[j]: round(float(nll[r, c]) / units[c], 5)
                                  for r, j in enumerate(judges)} if len(nll) else {}}
                for c in range(len(cands))]}

    def worth_summary(self: Any) -> dict[str, Any]:
        """What the summary says of who voted and, in select mode, whose answer won."""
        out: dict[str, Any] = {}
        if self.gate is not None:
            out.update(self.gate.to_dict(self.names))
        if self.selection is not None:
            out["select"] = self.selection
        return out
