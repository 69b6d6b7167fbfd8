"""Speculative decoding across the mesh: the id-fusion loop, several tokens a round.

A plain id session pays one network round and one forward of its slowest member per
token. Decoding is memory-bound, so a forward over a few positions costs little more than
over one. A speculative round (`SpecLeaderSession._decode`):

1. The leader holds every member's `DraftFrame` for step s: the frame at s, and the frame
   after each token of the draft d_1..d_n it sent with the round before.
2. It walks the positions: fuses position i exactly as the plain loop would (the same
   frames, the online weights updated token by token from each drafted token's exact
   log p), and keeps d_i while the fused choice is d_i (`pools.verify_draft`: greedy
   is identical token for token; sampling draws as the plain loop does, so a seed
   gives its tokens).
3. At the first position where the fused choice differs (or past the draft) it commits
   that choice: the round commits the accepted draft plus one token, at least one.
4. It drafts the next tokens (`drafting.PromptLookup`: the longest recent n-gram of the prompt
   and answer seen before, continued as it went on then; no model runs), as many as
   `drafting.DraftLength` says (fixed, or auto: what pays, given the measured acceptance and
   the members' forward times over one position and over several), and sends every
   member one `Tokens` message: the round's tokens and the next draft. Each member
   appends both in one forward (`Engine.step` with a draft keeps the drafted ids it
   commits and trims the rest) and answers one `DraftFrame`.
5. Or a member drafts (`--drafter member`, or auto where the cost model says it pays):
   the fastest member gets the round's tokens with `self_draft` = g, appends them and
   drafts g tokens greedily from its own model, one forward each, and answers with its
   draft and its frames at the drafted positions (exact: computed as it would commit
   them one by one). Then the others get the same tokens with that draft and verify it
   as in 4 (`_member_round`). A round costs the drafter's g + 1 forwards and one more
   network round trip before the verification, so it pays only where the drafter is
   much faster than the slowest member and mostly right.

Failover, deadlines, late and lost members work as in `leader.py` (this is a subclass):
a round reaches a member whole or not at all, and a leader taking over adopts a round
that reached only some from their frames' `round_ids`.

Owns: which member drafts, the speculative round's walk and its two phases. Does not:
choose what or how much to draft (`drafting`), fuse or choose (the plain loop's
`_fuse`/`_rng`/`_append`, `fusion.pools`), or compute anything on a model (members do,
in `Engine.step` with a draft).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from dwarfmesh.config import MAX_DRAFT
from dwarfmesh.fusion import pools
from dwarfmesh.sessions.drafting import MEMBER, DraftLength, PromptLookup
from dwarfmesh.sessions.leader import LeaderSession
from dwarfmesh.sessions.member import make_frame
from dwarfmesh.wire.protocol import DraftFrame, Frame, Token, Tokens

MEMORY_KEPT = 64        # sets of members whose measurements a node keeps between answers
NEAR_TIE = 0.9          # the leader drafts itself when within this of the fastest member


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
        self._kind = 0                     # ... and its kind (the n-gram length it matched,
                                           # or MEMBER)
        self._round_ids: list[int] = []    # the tokens the last round committed
        self._prefill: dict[str, float] = {}   # node id -> its first frame's forward (ms)
        self.drafter_node: str | None = None   # the member that drafted last
        self.rounds = self.drafted = self.accepted = 0
        self.by_kind: dict[str, list[int]] = {}   # drafter -> [rounds, drafted, accepted]

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
        self._prefill = {m: f.forward_ms for m, f in frames.items()}
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
            if reason is not None:
                self._send_round(self._tokens(msgs, ids, [], final=True), msgs, None)
                return reason, text
            drafter = self.params.drafter
            # only what this round may use: prompt lookup unless only a member drafts, a
            # member when asked for or when auto may choose one
            kind, draft = ((0, []) if drafter == "member"
                           else self.drafter.match(history[:held]))
            member = (self._member_drafter() if drafter == "member"
                      or (drafter == "auto" and self.length.auto) else None)
            source, g = self.length.plan(
                kind if draft else None,
                None if member is None else (member[1], int(member[0] != self.me.node_id)),
                only_member=drafter == "member")
            g = min(g, p.max_tokens - step - 1)
            t_step = time.perf_counter()
            if source == "member" and member is not None and g > 0:
                frames, round_s = await self._member_round(step, msgs, ids, member[0], g)
            else:
                draft = draft[:g] if source == "lookup" else []
                self._draft, self._kind = draft, kind
                round_msg = self._tokens(msgs, ids, draft)
                local = self.engine.step(self.session, ids, p.top_k, draft)
                frames = await self._gather(step, lambda only, r=round_msg, m=msgs:
                                            self._send_round(r, m, only), local)
                round_s = time.perf_counter() - t_step
                if not draft:             # every frame: one forward over one position
                    for m, f in frames.items():
                        self.length.timed_member(m, f.forward_ms / 1000.0)
            self.stats.stepped(time.perf_counter() - t_step, frames)
            verifiers = [f.forward_ms for m, f in frames.items() if m != self.drafter_node
                         or self._kind != MEMBER]
            if verifiers:
                self.length.timed(len(self._draft), round_s, max(verifiers) / 1000.0)
            self._learn(frames, cur, ids[-1])
        return "length", text

    def _tokens(self, msgs: list[Token], ids: list[int], draft: list[int],
                final: bool = False, self_draft: int = 0) -> Tokens:
        return Tokens(self.session, msgs[0].step, self._hash, [m.text for m in msgs], final,
                      self.term, np.asarray(ids, np.uint32), np.asarray(draft, np.uint32),
                      self_draft)

    def _member_drafter(self) -> tuple[str, float] | None:
        """The member that drafts (the fastest over one position, as measured in plain
        rounds; before that, by its first frame's time; this node on a near tie, since it
        drafts without a network round trip), and its forward time in seconds (None
        before it is measured: auto leaves it out, `--drafter member` drafts anyway)."""
        ids = [m.node_id for m in self.members]
        if len(ids) < 2:
            return None                   # alone, a member's draft would verify itself
        timed = self.length.forward
        known = timed if all(m in timed for m in ids) else self._prefill

        def cost(m: str) -> float:
            return known.get(m, float("inf")) * (NEAR_TIE if m == self.me.node_id else 1.0)
        best = min(ids, key=cost)
        t = timed.get(best)
        if t is None and self.params.drafter != "member":
            return None
        return best, t if t is not None else 0.0

    async def _member_round(self, step: int, msgs: list[Token], ids: list[int],
                            drafter: str, g: int) -> tuple[dict[str, Frame], float]:
        """A round drafted by a member, in two phases: the drafter appends the round's
        tokens and drafts `g` more greedily (its frames at drafted positions come with
        its draft), then the others get the same tokens with that draft and verify it in
        one forward. A drafter that stays silent is dropped as any member is, and the
        round goes on without a draft. Returns the frames and the time from the draft
        being in to the last frame (the verification's part of the round)."""
        p, me = self.params, self.me.node_id
        self.drafter_node = drafter
        if drafter == me:
            out = await self.engine.step(self.session, ids, p.top_k, None, g)
            self.own_out = out
            got: dict[str, Frame] = {me: self._own(step, out)}
        else:
            ask = self._tokens(msgs, ids, [], self_draft=g)
            got = await self._gather(
                step, lambda only: self._send_round(ask, msgs, {drafter}, origin=False),
                None, among=lambda: [drafter] if drafter in self._ids() else [])
        t_drafted = time.perf_counter()
        first = got.get(drafter)
        draft = [int(t) for t in first.draft] if isinstance(first, DraftFrame) else []
        if first is not None:
            self.length.timed_member(drafter, first.forward_ms / 1000.0 / (len(draft) + 1))
        self._draft, self._kind = draft, MEMBER
        if self.deposed is not None:
            return got, 0.0
        verify = self._tokens(msgs, ids, draft)
        others = {m.node_id for m in self.members} - {drafter}
        local = (self.engine.step(self.session, ids, p.top_k, draft) if me in others
                 else None)
        frames = await self._gather(
            step, lambda only: self._send_round(
                verify, msgs, others if only is None else only & others,
                had=set(got) - {me}),
            local, preset=got)
        return frames, time.perf_counter() - t_drafted

    def _count(self, took: int, rejected: bool) -> None:
        self.rounds += 1
        self.drafted += len(self._draft)
        self.accepted += took
        self.length.walked(took, rejected, self._kind)
        if self._draft:
            name = "member" if self._kind == MEMBER else self.drafter.name
            tally = self.by_kind.setdefault(name, [0, 0, 0])
            tally[0] += 1
            tally[1] += len(self._draft)
            tally[2] += took

    def _send_round(self, round_msg: Tokens, msgs: list[Token], only: set[str] | None,
                    origin: bool = True, had: set[str] = frozenset()) -> None:
        """The round to the remote members (or those in `only`) as one `Tokens`, then its
        tokens one by one to the origin when it is not a member (members first, so an
        origin never shows a token that no surviving member holds; not while only the
        drafter holds them, `origin` False). `had`: members that already got the round."""
        sent = set(had)
        for m in self.members:
            if m.node_id != self.me.node_id and (only is None or m.node_id in only):
                self.stats.wire_bytes += self.send(m.node_id, round_msg)
                sent.add(m.node_id)
        if not origin:
            return
        for msg in msgs:
            if msg.step == len(self.sent):
                self.sent.append(msg)
        if self.origin not in sent and (only is None or self.origin in only):
            for msg in msgs:
                self.send(self.origin, msg)

    def summary_extra(self) -> dict[str, Any]:
        length = self.length
        drafters = {name: {"rounds": r, "drafted": d, "accepted": a,
                           "acceptance": a / d if d else 0.0}
                    for name, (r, d, a) in self.by_kind.items()}
        main = max(drafters, key=lambda n: drafters[n]["drafted"], default=(
            "member" if self.params.drafter == "member" else self.drafter.name))
        names = {m.node_id: m.name for m in self.members + self.dropped}
        return {"speculate": {
            "drafter": main, "drafters": drafters,
            "member_drafter": names.get(self.drafter_node) if self.drafter_node else None,
            "auto": length.auto, "gamma_last": length.gamma,
            "rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
            "acceptance": self.accepted / self.drafted if self.drafted else 0.0,
            "tokens_per_round": len(self.tokens) / max(self.rounds, 1),
            "forward_ms_one_position": None if length.t1 is None else length.t1 * 1000.0,
            "forward_ms_per_drafted_position": (None if length.per_position is None
                                                else length.per_position * 1000.0)}}
