"""Text-level sessions on the leader: ensembles across different tokenizers.

`membership.plan_session` decides the path: id-level fusion (`leader.LeaderSession`)
when every live member shares one tokenizer; otherwise a text-level session over EVERY
live member, mode "rank" (the default for mixed meshes in auto mode: its scores are
exact) or, with `--mode fuse`, string-aligned fusion. `--mode rank` asks for ranking even
with one tokenizer. This module owns:

- `TextLeaderSession`: the leader's loop for one text session. The committed state is
  text; the leader sends `TextOpen`, then per step:
  rank: Proposal from each member -> `Candidates` -> Scores -> choose by weighted NLL per
  byte (textfuse.choose_candidate) -> `Commit`; fuse: TextFrame from each member ->
  textfuse.fuse_texts -> `Commit`. Members re-sync to each Commit and answer for the
  next step. A member that does not answer within the step timeout, that leaves, or
  that dies is dropped; the session goes on with the others. With `--step-deadline`
  the leader decides each step with the replies in hand at the deadline (a straggler is
  late, not dropped). After a failover a member's `TextResume` (the committed answer)
  restarts the loop at the next step: `Resume` instead of `TextOpen`, online weights
  from equal (text_resume.py; text_table.py says who takes over).

The leader itself takes part as an ordinary member through a local
`text_member.TextMemberSession` (messages to itself are dispatched locally), so its own
work overlaps the others'. This node's table of text sessions is
`text_table.TextTable`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np

from dwarfmesh.config import (
    MAX_PROMPT_TOKENS,
    OPEN_RESEND_S,
    PERPLEXITY_TAU,
    PREFILL_TIMEOUT_S,
    TEXT_ONLINE_ALPHA,
    TEXT_ONLINE_ETA,
)
from dwarfmesh.fusion import pools
from dwarfmesh.fusion import text as textfuse
from dwarfmesh.fusion.textcut import stop_at
from dwarfmesh.sessions.deadlines import reply_bound, resend_interval
from dwarfmesh.sessions.lead import Lead
from dwarfmesh.sessions.leader import PromptTooLong
from dwarfmesh.sessions.round import Round, Trigger
from dwarfmesh.sessions.select import Selecting
from dwarfmesh.sessions.stats import text_summary
from dwarfmesh.sessions.text_resume import TextFailover, TextResume
from dwarfmesh.wire.bounds import PIECE_BYTES, TEXT_LOGP_SLACK
from dwarfmesh.wire.modes import Mode
from dwarfmesh.wire.protocol import (
    Candidates,
    Commit,
    End,
    Proposal,
    Scores,
    TextFrame,
    TextOpen,
)

log = logging.getLogger(__name__)

RANK_CHUNK_TOKENS = 12      # most tokens a member proposes per round (before the cut)
TRACE_STEPS = 32            # steps of per-member detail kept in the summary's "trace"



class TextLeaderSession(Selecting, TextFailover, Lead):
    """Runs one answer as leader of a text-level session over `members` (this node too)."""

    OWN_REPLY_LOCAL = False   # its own member answers through the node, like the others

    def __init__(self, *, kind: Mode, resume: TextResume | None = None, **lead: Any) -> None:
        super().__init__(**lead)
        self.kind, self.resume = kind, resume
        self.behind: Counter[str] = Counter()    # steps decided without a member's reply
        self.text, self.weights = "", {}
        self._hash = textfuse.TEXT_HASH_START
        self._adopting = False          # resumed: still taking Commits a member is ahead by
        self.adopted = 0                # steps taken that way
        self._early: dict[str, tuple[Any, int]] = {}   # replies for a later step, by sender
        self._want: tuple[type, int] | None = None
        self.steps = self.wire_bytes = self.late = self.disagree = 0
        self.step_ms: list[float] = []
        self.phase_ms: dict[str, list[float]] = {"propose": [], "score": [], "frame": []}
        self.slowest_ms: list[float] = []
        self.agree: Counter[str] = Counter()
        self.trace: list[dict[str, Any]] = []
        self.prompt_tokens = self.first_bytes = self._n_candidates = 0
        self.t_start = self.t_first = self.t_last = time.perf_counter()

    # --- inputs from the node -------------------------------------------------------------

    def on_reply(self, msg: Proposal | Scores | TextFrame, size: int) -> None:
        ids = self._ids()
        if (self._adopting and self._want is not None and type(msg) is self._want[0]
                and msg.step > self._want[1] and msg.sender in ids):
            self._early[msg.sender] = (msg, size)        # ahead of us: see adopt()
            return
        if (self._want is None or type(msg) is not self._want[0] or msg.step != self._want[1]
                or msg.sender not in ids):
            self.late += 1
            if msg.sender in ids and not isinstance(msg, Scores):
                self._catch_up(msg)
            return
        problem = ("its text diverged" if msg.text_hash != self._hash
                   else _malformed(msg, self._n_candidates, self.kind))
        if problem:
            log.warning("session %s: %s: %s; leaving it out", self.session,
                        self.names.get(msg.sender), problem)
            self.member_lost(msg.sender)
            return
        self.wire_bytes += size
        self._slowest_s = max(self._slowest_s, msg.forward_ms / 1000.0)
        self._round.offer(msg.sender, msg)

    def _catch_up(self, msg: Proposal | TextFrame) -> None:
        """A reply for a step already committed: that member missed Commits (lost, or sent
        by a leader that died before reaching it). Send it what it lacks, at most once per
        resend interval."""
        commits = [c for c in self.sent if isinstance(c, Commit)]
        step = msg.step
        before = commits[step - 1].text_hash if 0 < step <= len(commits) else (
            textfuse.TEXT_HASH_START if step == 0 else None)
        if before != msg.text_hash or step >= len(commits):
            return
        now = time.monotonic()
        if now - self._caught_up.get(msg.sender, 0.0) < resend_interval(self._slowest_s):
            return
        self._caught_up[msg.sender] = now
        for commit in commits[step:]:
            self.wire_bytes += self.send(msg.sender, commit)

    # --- talking to members ---------------------------------------------------------------

    def _to_members(self, msg: Any, *, origin_too: bool = False,
                    dropped_too: bool = False, only: set[str] | None = None) -> None:
        targets = [m.node_id for m in self.members + (self.dropped if dropped_too else [])
                   if only is None or m.node_id in only]
        for node_id in targets:
            self.wire_bytes += self.send(node_id, msg)
        if origin_too and self.origin not in targets:
            self.send(self.origin, msg)

    def _trigger(self, msg: Any, origin_too: bool = False) -> Trigger:
        """Send a round's request: to everyone the first time (and the origin, for a
        Commit), to the silent members again on a resend."""
        def send(only: set[str] | None) -> None:
            self._to_members(msg, origin_too=origin_too and only is None, only=only)
        return send

    async def _gather(self, kind: type, step: int, send: Trigger, phase: str,
                      among: Callable[[], list[str]] | None = None,
                      limit: float | None = None) -> dict[str, Any]:
        """Expect `kind` replies for `step` (from every member, or those `among` returns),
        send what triggers them, and wait as a `Round` does (silent members are dropped;
        with --step-deadline, late ones are counted)."""
        t0 = time.perf_counter()
        self._want = (kind, step)
        self._round = rnd = Round(among or self._ids, send, me=self.me.node_id)
        rnd.open()
        first = step == 0 and kind is not Scores
        if limit is None:
            limit = PREFILL_TIMEOUT_S if first else reply_bound(self._slowest_s,
                                                                self.step_timeout_s)
        outcome = await rnd.close(limit, OPEN_RESEND_S if first
                                  else resend_interval(self._slowest_s),
                                  None if first else self.step_deadline_s)
        for node_id in outcome.late:
            self.behind[node_id] += 1
        for node_id in outcome.silent:
            log.warning("session %s: %s sent no %s for step %d in %.1fs; leaving it out",
                        self.session, self.names.get(node_id), kind.__name__, step, limit)
            self.member_lost(node_id)
        self._want = None
        self.phase_ms[phase].append((time.perf_counter() - t0) * 1000.0)
        replies = outcome.replies
        if replies:
            self.slowest_ms.append(max(r.forward_ms for r in replies.values()))
        return replies

    # --- the session ----------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Decode until EOS, a stop string, max_tokens or cancellation; return the summary."""
        p = self.params
        log.info("session %s: %s over %s", self.session, self.kind.value,
                 ", ".join(f"{m.name} ({m.model})" for m in self.members))
        prompt, templated = self.engine.render_prompt(self.prompt, self.messages, p.chat)
        self.prompt_tokens = len(self.engine.tokenizer.encode(
            prompt, add_special_tokens=not templated))
        limit = min(MAX_PROMPT_TOKENS, self.engine.context_length or MAX_PROMPT_TOKENS)
        if self.prompt_tokens + 1 > limit:
            raise PromptTooLong(f"prompt too long: {self.prompt_tokens} tokens, this mesh "
                                f"takes at most {limit - 1}")
        budget = p.max_tokens if self.kind is Mode.SELECT else RANK_CHUNK_TOKENS
        open_msg = TextOpen(self.session, self.me.node_id, self.origin,
                            [m.node_id for m in self.members], p, self.keep,
                            self.kind.text_open, self.prompt,
                            self.messages, budget, self.term)
        start = self._restore(budget) if self.resume else 0
        loop = {Mode.RANK: self._rank, Mode.SELECT: self._select}.get(self.kind, self._fuse)
        reason = await loop(self._send_resume() if self.resume
                            else self._trigger(open_msg), start)
        summary = text_summary(self, reason)
        summary.extra.update(self.worth_summary())
        if self.resume:     # the first step this leader decided; adopted: see adopt()
            summary.extra.update(resumed_at_step=start + self.adopted,
                                 adopted_steps=self.adopted)
        if self.term:
            summary.extra["term"] = self.term
        summary = summary.to_dict()
        if self.deposed is None:
            end = End(self.session, reason, summary, self.term)
            self.sent.append(end)
            self._to_members(end, origin_too=True, dropped_too=True)
        return summary

    async def _rank(self, send_open: Callable[[], None], start: int) -> str:
        p = self.params
        proposals = await self._gather(Proposal, start, send_open, "propose")
        self._adopting, start = False, self.steps
        self.weights = self._initial_weights(proposals)
        for step in range(start, p.max_tokens):
            order = [m.node_id for m in self.members if m.node_id in proposals]
            if any(proposals[m].answer_tokens >= p.max_tokens for m in order):
                return "length"
            cands, index = textfuse.unique_candidates(
                [(proposals[m].text, proposals[m].eos) for m in order])
            if not cands:
                return "error: no member proposed a continuation" if order else \
                    "error: no member answered"
            ask = Candidates(self.session, step, [t for t, _ in cands], [e for _, e in cands],
                             self.term)
            self._n_candidates = len(cands)
            scores = await self._gather(Scores, step, self._trigger(ask), "score")
            if self.deposed is not None:
                return "deposed"
            scorers = [m.node_id for m in self.members if m.node_id in scores]
            if not scorers:
                return "error: no member scored the candidates"
            nll = np.array([scores[m].nll for m in scorers], dtype=np.float64)
            w = np.array([self.weights[m] for m in scorers])
            best, per_unit = textfuse.choose_candidate(nll, w, cands)
            for m, i in zip(order, index):
                self.agree[m] += int(i == best)
            self.disagree += int(any(i != best for i in index))
            self._record(step, proposals={self.names[m]: [proposals[m].text, proposals[m].eos]
                                          for m in order},
                         candidates=[list(c) for c in cands],
                         nll={self.names[m]: list(nll[j]) for j, m in enumerate(scorers)},
                         weights={self.names[m]: float(x) for m, x in zip(scorers, w / w.sum())},
                         per_byte=[float(x) for x in per_unit], chosen=best)
            self._learn(scorers, -nll[:, best])
            text, eos = cands[best]
            commit, reason = self._commit(step, text, eos)
            if commit.final:
                self._to_members(commit, origin_too=True)
                return reason
            proposals = await self._gather(Proposal, step + 1,
                                           self._trigger(commit, origin_too=True), "propose")
            if self.deposed is not None:
                return "deposed"
        return "length"

    async def _fuse(self, send_open: Callable[[], None], start: int) -> str:
        p = self.params
        frames = await self._gather(TextFrame, start, send_open, "frame")
        self._adopting, start = False, self.steps
        self.weights = self._initial_weights(frames)
        for step in range(start, p.max_tokens):
            order = [m.node_id for m in self.members if m.node_id in frames]
            if not order:
                return "error: no member frames"
            fused = textfuse.fuse_texts(
                [textfuse.TextTopK(frames[m].texts, frames[m].logprobs, frames[m].eos_logp,
                                   frames[m].rest_mass, self._vocab(m)) for m in order],
                np.array([self.weights[m] for m in order]), p.fuse)
            rng = np.random.default_rng([p.seed or 0, step]) if p.temperature > 0 else None
            best = pools.choose(pools.Fused(np.arange(len(fused.candidates)), fused.probs,
                                              fused.member_top),
                                 temperature=p.temperature, top_p=p.top_p, rng=rng)
            for m, top in zip(order, fused.member_top):
                self.agree[m] += int(top == best)
            self.disagree += int(np.any(fused.member_top != best))
            text, eos = fused.candidates[best]
            self._record(step, top={self.names[m]: [[t, float(lp)] for t, lp in
                                                    zip(frames[m].texts[:4], frames[m].logprobs)]
                                    for m in order},
                         eos_logp={self.names[m]: frames[m].eos_logp for m in order},
                         weights={self.names[m]: self.weights[m] for m in order},
                         piece=text, eos=eos)
            commit, reason = self._commit(step, text, eos, steps_left=p.max_tokens - step - 1)
            if commit.final:
                self._to_members(commit, origin_too=True)
                return reason
            frames = await self._gather(TextFrame, step + 1,
                                        self._trigger(commit, origin_too=True), "frame")
            if self.deposed is not None:
                return "deposed"
            present = [m for m in frames if frames[m].prev_logp is not None]
            self._learn(present, np.array([frames[m].prev_logp for m in present]))
        return "length"

    def _commit(self, step: int, piece: str, eos: bool,
                steps_left: int | None = None) -> tuple[Commit, str]:
        """Append the chosen piece (cut at a stop string); decide whether it is the last."""
        p = self.params
        text = self.text + piece
        final, reason = eos, "eos"
        cut = stop_at(text, len(piece), p.stop)
        if cut is not None:
            piece = piece[:max(len(piece) - (len(text) - cut), 0)]
            text, final, reason = text[:cut], True, "stop"
        if not final and steps_left is not None and steps_left <= 0:     # fuse: steps
            final, reason = True, "length"
        if self._cancelled and not final:
            final, reason = True, "cancelled"
        self.text, self._hash = text, textfuse.text_hash(self._hash, piece)
        self.steps += 1
        now = time.perf_counter()
        if step == 0:
            self.t_first, self.first_bytes = now, textfuse.utf8_len(text)
        else:
            self.step_ms.append((now - self.t_last) * 1000.0)
        self.t_last = now
        commit = Commit(self.session, step, piece, self._hash, final, RANK_CHUNK_TOKENS,
                        self.term)
        self.sent.append(commit)
        return commit, reason

    def _vocab(self, node_id: str) -> int:
        return next(m.vocab_size for m in self.members if m.node_id == node_id)

    def _record(self, step: int, **detail: Any) -> None:
        if step < TRACE_STEPS:
            self.trace.append({"step": step, **detail})

    def _learn(self, order: list[str], logp: np.ndarray) -> None:
        if self.params.weights == "online":
            pools.online_step(self.weights, order, logp, eta=TEXT_ONLINE_ETA,
                               alpha=TEXT_ONLINE_ALPHA)

    def _initial_weights(self, replies: dict[str, Any]) -> dict[str, float]:
        """As the id path, but from prompt NLL per BYTE (comparable across tokenizers)."""
        return pools.initial_weights(self.params.weights, self.members, replies,
                                      PERPLEXITY_TAU)


def _malformed(msg: Any, n_candidates: int, kind: Mode) -> str:
    """Why a reply cannot be used in this round. What a message can say about itself
    (lengths, finite values, signs: a TextFrame's strings and log-probs) is checked when
    it is decoded (`wire.bounds`); this checks it against the round."""
    if isinstance(msg, Scores) and len(msg.nll) != n_candidates:
        return "scores for the wrong number of candidates"
    if isinstance(msg, Scores) and not all(np.isfinite(v) and v >= -TEXT_LOGP_SLACK
                                           for v in msg.nll):
        # (re-encoding the text may gain a little; nothing gains more than the slack)
        return "scores must be finite NLLs"
    if isinstance(msg, Proposal) and kind is not Mode.SELECT and (
            textfuse.utf8_len(msg.text) > PIECE_BYTES):
        return "a proposal longer than a rank round's piece"
    return ""
