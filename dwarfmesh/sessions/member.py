"""A member's side of one session: prefill on Open, a frame per committed token, free on End.

Besides computing frames, a member keeps everything needed to carry the session on when
its leader dies: the prompt ids, the committed tokens, the params, the origin and the
session's member list (for the rendezvous rank), and the last frame it computed. The
node decides *whether* this member takes over (`membership.rank_for_session`);
`leader.LeaderSession.resume` does the taking over from this state.

Tokens are queued and drained together: a member that fell behind (a straggler under
`--step-deadline`) feeds every queued token through the model in one forward and sends
one frame for the newest step, so it catches up instead of stalling the session.

Only the session's leader is followed (`follow`): messages from the leader of the
highest (term, rendezvous rank) claim this member has seen. A would-be leader with a
weaker claim (paused, cut off, or deposed by a takeover) is answered `Deposed`. A copy of
a Token this member already applied is answered with its frame again: that is how a
leader asks for a frame it lost.

Owns: an id member's session (ordered apply under one lock, hash check, Leave), the
rule for following a leader and for what a member does when its leader dies (shared with
text members). Does not: lead, or decide whom it follows after a death (`membership`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dwarfmesh.config import MAX_DRAFT
from dwarfmesh.mesh.membership import outranks, successor
from dwarfmesh.sessions.ports import Send
from dwarfmesh.wire.protocol import (
    Deposed,
    DraftFrame,
    Frame,
    GenParams,
    Leave,
    Open,
    Token,
    Tokens,
    extend_hash,
    prefix_hash,
)

log = logging.getLogger(__name__)



def follow_leader(member: Any, sender: str, term: int) -> bool:
    """Whether a leader's message from `sender` in `term` is the session's leader's, for
    an id or a text member (`session`, `leader`, `term`, `claimed`, `members`, `fresh`,
    `send`, `last_heard`).

    A claim that beats the current leader's (a takeover whose Resume this member has not
    seen yet) is followed from now on. The lease protects a leader that has led this
    member in its term, not one it only expects (the successor it ranked first after a
    death). A weaker claim, or a takeover while the leader is still heard from (the
    claimer was cut off, not the leader), is told who leads."""
    if (sender, term) == (member.leader, member.term):
        member.last_heard = time.monotonic()
        member.claimed = True
        return True
    if sender not in member.members:
        return False
    if outranks(member.session, (term, sender), (member.term, member.leader)) and (
            member.leader == sender or not member.claimed or not member.fresh(member.leader)):
        member.leader, member.term, member.claimed = sender, term, True
        member.last_heard = time.monotonic()
        return True
    member.send(sender, Deposed(member.session, member.leader, member.term))
    return False


def leader_died(member: Any, dead: str, alive: set[str], me: str) -> bool:
    """The session's leader `dead` is gone: what this member does, for an id or a text
    member (one rule for both). Returns whether this node takes over.

    The survivors rank the session's members by the same rendezvous hash
    (`membership.successor`). The first takes over; the others expect it. A member that
    sees less than half of the session (and not its origin) abstains: it is probably the
    one cut off, and taking over would make a second leader. A member that does not take
    over keeps its state (a new leader's Resume, or the old one's next message once the
    partition heals, finds it ready) until no leader of the session has spoken to it for
    `deadlines.MEMBER_IDLE_S`: then the member sweep frees it."""
    nxt = successor(member.session, member.members, alive, me, member.origin)
    member.claimed = False           # the lease protects a leader that leads, not a guess
    if nxt.action == "take-over":
        member.taken_over = True
        return True
    if nxt.action == "abstain":
        log.warning("session %s: leader %s unreachable but so is most of the session; not "
                    "taking over", member.session, dead)
    else:
        member.leader = nxt.leader
        log.info("session %s: leader %s gone; %s takes over", member.session, dead,
                 nxt.leader)
    return False


class MemberSession:
    def __init__(self, open_msg: Open, *, me: str, engine: Any, send: Send,
                 fresh: Callable[[str], bool] = lambda _node: False) -> None:
        self.session = open_msg.session
        self.leader = open_msg.leader
        self.origin = open_msg.origin
        self.members = list(open_msg.members)
        self.params: GenParams = open_msg.params
        self.keep = open_msg.keep
        self.prompt_ids = [int(t) for t in open_msg.prompt_ids]
        self.me, self.engine, self.send = me, engine, send
        self.fresh = fresh             # heard from that node within the lease (deadlines)
        self.committed: list[int] = []
        self.hashes: list[int] = []    # the prefix hash before each committed token
        self.term = 0                  # the leader's term (see follow)
        self.claimed = True            # `leader` has led us in `term` (not just expected)
        self.last_heard = time.monotonic()   # from the leader (idle sessions are freed)
        self.hash = prefix_hash(self.prompt_ids)
        self.last_frame: Frame | None = None
        self.closed = False
        self.taken_over = False        # this node now leads the session
        self._queue: list[Token] = []
        # (step after a round, its draft, how many tokens this member drafts itself)
        self._draft: tuple[int, list[int], int] = (-1, [], 0)
        self._round: list[int] = []    # the ids the last drained batch appended
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    def _frame(self, out: Any) -> Frame:
        last = self.committed[-1] if self.committed else -1
        return make_frame(out, self.session, len(self.committed), self.me, self.hash, last,
                          self._round if self.params.speculate else None)

    def _send_frame(self) -> None:
        if self.last_frame is not None and not self.taken_over:
            self.send(self.leader, self.last_frame)

    async def open(self) -> None:
        async with self._lock:
            try:
                out = await self.engine.open(self.session, self.prompt_ids, self.params.top_k)
            except (RuntimeError, ValueError) as exc:   # EngineBusy, a bad prompt
                self._leave(str(exc))
                return
            self.last_frame = self._frame(out)
            self._send_frame()

    def follow(self, sender: str, term: int) -> bool:
        """Whether a leader's message from `sender` in `term` is this session's leader's
        (see `follow_leader`)."""
        return follow_leader(self, sender, term)

    def token(self, msg: Token | Tokens) -> None:
        """Queue a committed token, or a speculative round's tokens and draft; the drain
        task applies them (with any that follow)."""
        if isinstance(msg, Tokens):
            n = len(msg.token_ids)
            for i, t in enumerate(msg.token_ids):
                last = i == n - 1
                # Only the round's last hash travels: it checks every id before it.
                self._queue.append(Token(msg.session, msg.step + i, int(t),
                                         msg.prefix_hash if last else None, msg.texts[i],
                                         msg.final and last, msg.term))
            if msg.step + n >= self._draft[0]:      # not a late copy of an older round
                self._draft = (msg.step + n, [int(t) for t in msg.draft], msg.self_draft)
        else:
            self._queue.append(msg)
        task = asyncio.get_running_loop().create_task(self._drain())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        async with self._lock:
            if self.closed or not self._queue:
                return
            batch, self._queue = self._queue, []
            new: list[int] = []
            hashes: list[int] = []
            h = self.hash
            final = False
            for msg in sorted(batch, key=lambda m: m.step):
                step = len(self.committed) + len(new)
                if msg.step < step:          # a duplicate (e.g. re-sent after a failover)
                    known = (self.committed + new)[msg.step]
                    if known != msg.token_id:
                        return await self._diverged(msg.step)
                    continue
                if msg.step > step:
                    return await self._diverged(msg.step, "a token is missing")
                expected = extend_hash(h, msg.token_id)
                if msg.prefix_hash is not None and msg.prefix_hash != expected:
                    return await self._diverged(msg.step)
                hashes.append(h)
                h = expected
                new.append(msg.token_id)
                final = final or msg.final
            if not new:
                self._send_frame()           # a leader that lost our frame gets it again
                return
            if final:
                self._commit(new, hashes, h)
                await self._close()
                return
            after, draft, own = self._draft
            if after != len(self.committed) + len(new):
                draft, own = None, 0
            out = await self.engine.step(self.session, new, self.params.top_k, draft, own)
            # Committed state changes only with the KV cache, under the lock: a takeover
            # that captures it (`state`, under the same lock) sees them agree.
            self._commit(new, hashes, h)
            self._round = new
            self.last_frame = self._frame(out)
            self._send_frame()

    def _commit(self, new: list[int], hashes: list[int], h: int) -> None:
        self.committed.extend(new)
        self.hashes.extend(hashes)
        self.hash = h

    def resume(self, new_leader: str, term: int) -> None:
        """A new leader took over (`follow` checked its claim): send it our latest frame
        (one behind it gets the Tokens it lacks in answer)."""
        self.leader, self.term = new_leader, term
        self._send_frame()

    def resend(self) -> None:
        """The leader sent its Open again: it lost our first frame, or is asking."""
        self.last_heard = time.monotonic()
        if not self._lock.locked():
            self._send_frame()

    async def end(self) -> None:
        async with self._lock:
            await self._close()

    async def _diverged(self, step: int, why: str = "committed prefix diverged") -> None:
        self.keep = False
        await self._close()
        self._leave(f"{why} at step {step}")

    def _leave(self, reason: str) -> None:
        log.warning("session %s: leaving: %s", self.session, reason)
        self.closed = True
        self.send(self.leader, Leave(self.session, self.me, reason))

    async def _close(self) -> None:
        if not self.closed:
            self.closed = True
            await self.engine.close(self.session, keep=self.keep)

    async def state(self) -> dict[str, Any]:
        """What a takeover needs (see leader.LeaderSession.resume), taken when no step
        is in flight, so the committed tokens, their hashes, the last frame and the KV
        cache all agree."""
        async with self._lock:
            return {"prompt_ids": np.asarray(self.prompt_ids),
                    "committed": list(self.committed), "hashes": list(self.hashes),
                    "hash": self.hash, "last_frame": self.last_frame, "term": self.term}


def make_frame(out: Any, session: str, step: int, sender: str, prefix: int, last: int,
               round_ids: list[int] | None) -> Frame:
    """The frame for `step` from an engine step's output: a `DraftFrame` in a speculative
    session (round_ids not None: what this frame's step appended), else a `Frame`."""
    base = (session, step, sender, prefix, out.rest_mass, out.prev_logp, last,
            out.prompt_nll, out.forward_ms, out.ids, out.logprobs)
    if round_ids is None:
        return Frame(*base)
    more = out.more
    return DraftFrame(
        *base, np.asarray(out.draft, dtype=np.uint32),
        np.asarray(out.draft_logp, dtype=np.float32),
        np.asarray([r for _, _, r in more], dtype=np.float32),
        np.concatenate([i for i, _, _ in more]) if more else np.zeros(0, np.uint32),
        np.concatenate([lp for _, lp, _ in more]) if more else np.zeros(0, np.float16),
        np.asarray(round_ids[-(MAX_DRAFT + 1):], dtype=np.uint32))
