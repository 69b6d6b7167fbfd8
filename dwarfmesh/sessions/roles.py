"""The session roles a node plays: origin for its clients, leader, member — and failover.

- **origin**: a client's `Generate` arrives; the origin elects the leader from its view
  of the mesh (rendezvous hash over the largest same-tokenizer group), sends it `Start`,
  and streams `Token`s back to the client exactly once each, in step order. A Start the
  leader never acknowledges is sent again, and to the next leader by rank once the first
  one is dead (with a later term, so the two can never both lead).
- **leader**: runs `session.LeaderSession`.
- **member**: runs `member.MemberSession`.
- **failover**: when a session's leader dies, every member ranks the session's surviving
  members by the same rendezvous hash (`membership.successor`); the first one takes over
  (`LeaderSession` with `resume_from`, in the next term), the others wait for its
  `Resume`. A client whose node died re-attaches to another node (`Attach`), which
  becomes the origin and streams from `next_step`.

Authority: every session message is acted on only when it comes from the node that the
session's state says may send it (`sender` is the peer the transport heard it from, never
a field of the message): a leader's Tokens, End and Resume only from the leader of the
best claim (`MemberSession.follow`), frames and Leave from a member of the session,
Cancel from the session's client or origin. Anything else is dropped and counted
(`node.refused`). A leader may hold at most `PEER_SESSION_SHARE` of this node's sessions
as a member, and a member session that hears nothing from its leader for
`deadlines.MEMBER_IDLE_S` is freed.

The node owns the sockets and the membership; this class owns the session tables.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dwarfmesh.config import (
    FAILOVER_GRACE_S,
    HEARTBEAT_INTERVAL_S,
    OPEN_RESEND_S,
    PREFILL_TIMEOUT_S,
)
from dwarfmesh.mesh.membership import elect_leader, outranks, plan_session, successor
from dwarfmesh.sessions.deadlines import MEMBER_IDLE_S, ORIGIN_PROBE_S, RESEND_S, START_ACK_S
from dwarfmesh.sessions.leader import LeaderSession, PromptTooLong
from dwarfmesh.sessions.member import MemberSession
from dwarfmesh.sessions.speculate import DraftLength, SpecLeaderSession
from dwarfmesh.sessions.text_member import TextSessions
from dwarfmesh.wire import protocol as P

log = logging.getLogger(__name__)

FINISHED_KEEP_S = 120.0        # a leader keeps a finished answer this long for re-attaching
FINISHED_KEEP_COUNT = 256      # a member remembers who led this many finished sessions
PEER_SESSION_SHARE = 0.5       # most of this node's session slots one leader may hold


@dataclass
class ClientStream:
    identity: bytes
    session: str
    leader: str
    next_step: int
    last_heard: float
    members: set[str] = field(default_factory=set)   # who may lead it after a failover
    term: int = 0
    leader_lost_at: float | None = None
    start: Any = None              # the Start message, re-sent until the leader acknowledges
    acked: bool = False
    request: Any = None            # the Generate (a copy re-sent by the client is the same)
    claimed: bool = True           # the leader has not been declared dead since it led
    asked_from: int = -1           # the step a replay was last asked from (gaps)
    asked_at: float = 0.0          # ... and when
    sent_at: float = 0.0           # when the Start was last sent (resends)
    probed_at: float = 0.0         # when a silent leader was last asked for a replay
    started_at: float = 0.0        # when the Start was first sent to this leader

    def follow(self, session: str, sender: str, term: int, fresh) -> bool | None:
        """True: from the stream's leader (now). False: a weaker claim, or a stronger one
        while the current leader is still heard from (a cut-off member's takeover). None:
        not a member of the session at all."""
        if (sender, term) == (self.leader, self.term):
            return True
        if sender not in self.members and sender != self.leader:
            return None
        if outranks(session, (term, sender), (self.term, self.leader)) and (
                not self.claimed or not fresh(self.leader)):
            self.leader, self.term, self.leader_lost_at = sender, term, None
            self.claimed = True
            return True
        return False


class SessionRoles:
    def __init__(self, node: Any) -> None:
        self.node = node
        self.leading: dict[str, LeaderSession] = {}
        self.member_of: dict[str, MemberSession] = {}
        self.clients: dict[str, ClientStream] = {}
        # Recently finished sessions, so a client that re-attaches late still gets its
        # answer: as leader, what was streamed; as member, who led.
        self.finished: dict[str, tuple[float, list[Any]]] = {}
        self.spec_memory: dict[frozenset[str], DraftLength] = {}   # speculate auto's costs
        self.led_by: dict[str, tuple[str, int]] = {}   # session -> (leader, term)
        self.text = TextSessions(node)   # sessions across tokenizers (rank, fuse-text)

    def refuse(self, why: str) -> None:
        self.node.refused(why)

    # --- origin -----------------------------------------------------------------------

    def generate(self, req: P.Generate, identity: bytes) -> None:
        node = self.node
        session = req.conversation or req.request
        client = self.clients.get(session)
        if client is not None:
            if client.request == req:            # the client sent it again: same answer
                client.identity = identity
                return
            node.transport.reply(identity, P.Error(
                session, f"session {session} is already answering; wait for it"))
            return
        if self._running_here(session):
            # The client's node died after the session started; the client asks again
            # here: stream the one answer from its start, never start a second.
            self.attach(P.Attach(session, "", 0), identity)
            return
        self._start(session, req, identity, term=0, avoid=set())

    def _start(self, session: str, req: P.Generate, identity: bytes, term: int,
               avoid: set[str]) -> bool:
        node = self.node
        alive = [m for m in node.membership.reachable() if m.node_id not in avoid]
        plan = plan_session(req.params, alive)
        if not plan.group:
            return False
        leader = elect_leader(session, plan.group)
        for _member, why in plan.excluded:
            log.warning("session %s: leaving out %s", session, why)
        log.info("session %s: leader %s (term %d), members %s", session, leader.name, term,
                 ", ".join(m.name for m in plan.group))
        start = P.Start(session, node.node_id, req.prompt, req.params, req.messages,
                        bool(req.conversation), term)
        old = self.clients.get(session)
        self.clients[session] = ClientStream(
            identity, session, leader.node_id, old.next_step if old else 0, time.monotonic(),
            members={m.node_id for m in plan.group}, term=term, start=start, request=req,
            sent_at=time.monotonic(), started_at=time.monotonic())
        node.send_to(leader.node_id, start)
        if old is None:
            node.spawn(self._watch_client(session))
        return True

    def _running_here(self, session: str) -> bool:
        member = self.member_of.get(session)
        return (session in self.leading or (member is not None and not member.closed)
                or self.text.running(session))

    def attach(self, msg: P.Attach, identity: bytes) -> None:
        """A client re-attaches here after its node died: become the session's origin."""
        node = self.node
        member = self.member_of.get(msg.session)
        if (member is not None and not member.closed and not member.taken_over
                and member.leader not in node.membership.peers):
            # Its leader is gone and this member held back (it saw a minority, without
            # the origin); the client is here now, so this side goes on.
            member.origin = node.node_id
            alive = {m.node_id for m in node.membership.alive()}
            nxt = successor(msg.session, member.members, alive, node.node_id, node.node_id)
            if nxt.action == "take-over":
                member.taken_over = True
                member.leader = node.node_id      # (the Attach below: a gap replays)
                node.spawn(self._take_over(member, alive))
            elif nxt.action == "wait":
                member.leader, member.claimed = nxt.leader, False
        leader_id = (node.node_id if msg.session in self.leading or msg.session in self.finished
                     else member.leader if member is not None
                     else self.text.leader_of(msg.session)
                     or self.led_by.get(msg.session, ("", 0))[0])
        if not leader_id:
            node.transport.reply(identity, P.Error(msg.session, "unknown session"))
            return
        members = (set(member.members) if member is not None
                   else self.text.members_of(msg.session))
        if member is not None:
            term = member.term
        elif msg.session in self.leading:
            term = self.leading[msg.session].term
        elif msg.session in self.finished and self.finished[msg.session][1]:
            term = getattr(self.finished[msg.session][1][-1], "term", 0)
        elif self.text.running(msg.session):
            term = self.text.term_of(msg.session)
        else:
            term = self.led_by.get(msg.session, ("", 0))[1]
        fresh = msg.session not in self.clients
        self.clients[msg.session] = ClientStream(identity, msg.session, leader_id,
                                                 msg.next_step, time.monotonic(),
                                                 members=members, term=term, acked=True)
        node.send_to(leader_id, P.Attach(msg.session, node.node_id, msg.next_step))
        # Acknowledge at once: the leader may have nothing to stream yet (prefill).
        node.transport.reply(identity, P.Resume(msg.session, leader_id, msg.next_step, term))
        if fresh:
            node.spawn(self._watch_client(msg.session))

    def to_client(self, msg: P.Token | P.Tokens | P.End | P.Resume, sender: str) -> None:
        if isinstance(msg, P.Tokens):
            # A speculative round reached this origin as a member: its tokens one by one
            # (the client does not check hashes: only the round's last one is known).
            n = len(msg.token_ids)
            for i, t in enumerate(msg.token_ids):
                self.to_client(P.Token(msg.session, msg.step + i, int(t),
                                       msg.prefix_hash if i == n - 1 else 0, msg.texts[i],
                                       msg.final and i == n - 1, msg.term), sender)
            return
        client = self.clients.get(msg.session)
        if client is None:
            return
        follows = client.follow(msg.session, sender, msg.term, self.node.fresh)
        if follows is None:
            self.refuse("session message from a non-member")
            return
        if not follows:
            self.node.send_to(sender, P.Deposed(msg.session, client.leader, client.term))
            return
        client.last_heard = time.monotonic()
        client.acked = True
        if isinstance(msg, P.Resume):
            return
        if isinstance(msg, P.Token):
            if msg.step > client.next_step:
                # A gap (this origin took over from a dead one, or Tokens were lost, e.g.
                # while the leader took this node for dead): the leader replays from the
                # first step the client lacks.
                self._ask_replay(client)
            if msg.step != client.next_step:
                return                   # streamed already, or after the gap (replayed)
            client.next_step += 1
        if isinstance(msg, P.End):
            steps = msg.summary.get("steps")
            if isinstance(steps, int) and client.next_step < steps:
                # Pieces are still missing: never end a stream with a hole in it. The
                # replay brings them, and the End again after them.
                self._ask_replay(client)
                return
            msg.summary.setdefault("mode", "fuse-ids")   # text sessions set theirs
        self.node.transport.reply(client.identity, msg)
        if isinstance(msg, P.End):
            del self.clients[msg.session]
            self.remember_leader(msg.session, client.leader, client.term)

    def _ask_replay(self, client: ClientStream) -> None:
        """Ask the leader for every piece from the first one the client lacks; again
        after a resend interval while that piece has not come (the Attach, or the
        replay, can be lost too)."""
        now = time.monotonic()
        if client.asked_from == client.next_step and now - client.asked_at < RESEND_S:
            return
        client.asked_from, client.asked_at = client.next_step, now
        self.node.send_to(client.leader, P.Attach(client.session, self.node.node_id,
                                                  client.next_step))

    async def _watch_client(self, session: str) -> None:
        """Re-send an unacknowledged Start (to the next leader once the first is dead);
        tell the client when its leader is gone for good, rather than letting it hang."""
        tried: set[str] = set()
        while session in self.clients:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            client = self.clients.get(session)
            if client is None:
                return
            now = time.monotonic()
            alive = (client.leader == self.node.node_id
                     or client.leader in self.node.membership.peers)
            if client.asked_from == client.next_step and alive:
                self._ask_replay(client)         # a replay asked for has not come yet
            if (client.acked and alive and client.leader != self.node.node_id
                    and now - max(client.last_heard, client.probed_at) > ORIGIN_PROBE_S):
                # Silence from a live leader: a long prefill, or its last Token or End
                # was lost (it may have taken this node for dead a moment). Ask for what
                # is missing; a finished leader replays from its finished answers.
                client.probed_at = now
                self.node.send_to(client.leader, P.Attach(session, self.node.node_id,
                                                          client.next_step))
            silent = not client.acked and now - client.started_at > START_ACK_S
            if not client.acked and (not alive or silent) and client.request is not None:
                # The leader died before it took the session, or is heard from but never
                # acknowledges a Start (a live node acknowledges at once, before its
                # prefill): the next one by rank leads it, in a later term (should the
                # first take it after all, it is deposed).
                tried.add(client.leader)
                log.warning("session %s: leader %s %s; re-electing", session, client.leader,
                            "gone before it started" if not alive
                            else f"never acknowledged the session in {START_ACK_S:.0f}s")
                if self._start(session, client.request, client.identity, client.term + 1,
                               tried):
                    continue
                if silent:
                    del self.clients[session]
                    self.node.transport.reply(client.identity, P.Error(
                        session, "no member acknowledged the session "
                        f"(tried {', '.join(sorted(tried))})"))
                    return
            if not client.acked and now - client.sent_at > OPEN_RESEND_S:
                # The Start may have been lost (e.g. the leader had just restarted): again.
                client.sent_at = now
                self.node.send_to(client.leader, client.start)
            if alive:
                client.leader_lost_at = None
            elif client.leader_lost_at is None:
                client.leader_lost_at = now      # give the members time to fail over
            lost = (client.leader_lost_at is not None
                    and now - client.leader_lost_at > FAILOVER_GRACE_S)
            if lost or now - client.last_heard > PREFILL_TIMEOUT_S:
                del self.clients[session]
                self.node.transport.reply(client.identity, P.Error(
                    session, "the session's leader stopped answering and no member took over"))

    # --- leader -----------------------------------------------------------------------

    async def lead(self, start: P.Start, sender: str) -> None:
        node = self.node
        if sender != start.origin:
            self.refuse("Start from another node than its origin")
            return
        running = self.leading.get(start.session)
        if running is not None or start.session in self.text.leading:
            # A re-sent Start: already running; acknowledge (and stream to this origin).
            leader = running or self.text.leading[start.session]
            node.send_to(start.origin, P.Resume(start.session, node.node_id, 0, leader.term))
            if leader.origin != start.origin:
                leader.set_origin(start.origin, 0)
            return
        # Acknowledge (the origin re-sends an unacknowledged Start): "I lead it from step 0".
        node.send_to(start.origin, P.Resume(start.session, node.node_id, 0, start.term))
        plan = plan_session(start.params, node.membership.reachable())
        log.info("session %s: %s (%s)", start.session, plan.kind, plan.why)
        if plan.kind != "fuse-ids":
            await self.text.lead(start, plan)
            return
        group, excluded = plan.group, plan.excluded
        if all(m.node_id != node.node_id for m in group):
            group = [node.me]
        await self._run_leader(start.session, self.leader_for(start.params)(
            session=start.session, origin=start.origin, prompt=start.prompt,
            params=start.params, members=group, me=node.me, engine=node.engine,
            send=node.send_to, messages=start.messages, keep=start.keep, excluded=excluded,
            term=start.term, **node.session_timeouts()))

    def leader_for(self, params: P.GenParams) -> Callable[..., LeaderSession]:
        """The leader's loop for an id session: speculative rounds when asked (starting
        from what this node measured for the same members last time)."""
        if params.speculate:
            return functools.partial(SpecLeaderSession, memory=self.spec_memory)
        return LeaderSession

    async def _run_leader(self, session: str, leader: LeaderSession) -> None:
        self.leading[session] = leader
        try:
            await leader.run()
        except Exception as exc:  # noqa: BLE001 - report any failure to the client, then log it
            if isinstance(exc, PromptTooLong):
                log.warning("session %s: %s", session, exc)
            else:
                log.exception("session %s failed", session)
            self.node.send_to(leader.origin, P.End(session, f"error: {exc}", {}, leader.term))
            for m in leader.members:
                if m.node_id != self.node.node_id:
                    self.node.send_to(m.node_id, P.End(session, "error", {}, leader.term))
        finally:
            if self.leading.get(session) is leader:
                del self.leading[session]
            member = self.member_of.get(session)
            if member is not None and member.taken_over:
                del self.member_of[session]
            if leader.deposed is None:
                self.keep_finished(session, leader.sent)

    def keep_finished(self, session: str, sent: list[Any]) -> None:
        """Keep what a finished session streamed, for a client that re-attaches late."""
        now = time.monotonic()
        self.finished[session] = (now, sent)
        for key, (t, _) in list(self.finished.items()):
            if now - t > FINISHED_KEEP_S:
                del self.finished[key]

    def frame(self, msg: P.Frame, size: int, sender: str) -> None:
        leader = self.leading.get(msg.session)
        if leader is None:
            return
        if sender != msg.sender:
            self.refuse("frame sent for another node")
            return
        leader.on_frame(msg, size)

    def leave(self, msg: P.Leave, sender: str) -> None:
        if sender != msg.sender:
            self.refuse("Leave sent for another node")
            return
        self.text.leave(msg.session, msg.sender, msg.reason)
        leader = self.leading.get(msg.session)
        if leader is not None and msg.sender in leader._ids():
            log.warning("session %s: %s left: %s", msg.session, msg.sender, msg.reason)
            leader.member_lost(msg.sender)

    def deposed(self, msg: P.Deposed, sender: str) -> None:
        leader = self.leading.get(msg.session)
        if leader is not None:
            leader.on_deposed(msg, sender)
        self.text.deposed(msg, sender)

    def leader_attach(self, msg: P.Attach, sender: str) -> None:
        if sender != msg.origin:
            self.refuse("Attach for another node")
            return
        leader = self.leading.get(msg.session) or self.text.leading.get(msg.session)
        if leader is not None and sender not in leader.roster:
            # Only a node of the session can become its origin: the client re-attaches
            # through one of them (roles.attach), never through a stranger.
            self.refuse("Attach from a node outside the session")
            return
        (log.debug if leader is not None and leader.origin == msg.origin else log.info)(
            "session %s: origin %s asks from step %d", msg.session, msg.origin,
            msg.next_step)
        member = self.member_of.get(msg.session)
        if msg.session in self.leading:
            self.leading[msg.session].set_origin(msg.origin, msg.next_step)
        elif member is not None and member.taken_over:
            member.origin = msg.origin       # a takeover under way: it streams there
        elif self.text.attach(msg):          # a text session this node leads
            pass
        elif msg.session in self.finished:
            for sent in self.finished[msg.session][1][msg.next_step:]:
                self.node.send_to(msg.origin, sent)

    def cancel(self, session: str, sender: str | None, identity: bytes | None) -> None:
        """Stop an answer: from its client (to the origin), or from its origin (to the
        leader). Nobody else may."""
        client = self.clients.get(session)
        if sender is None:                       # a client: only the one it streams to
            if client is None or client.identity != identity:
                self.refuse("Cancel from a client that does not own the session")
                return
            if client.leader != self.node.node_id:
                self.node.send_to(client.leader, P.Cancel(session))
                return
            sender = self.node.node_id
        leader = self.leading.get(session)
        if leader is not None and sender == leader.origin:
            leader.cancel()
        self.text.cancel(session, sender)

    # --- member -----------------------------------------------------------------------

    async def open(self, msg: P.Open, sender: str) -> None:
        node = self.node
        if sender != msg.leader:
            self.refuse("Open from another node than its leader")
            return
        current = self.member_of.get(msg.session)
        if current is not None and not current.closed:
            if (current.leader, current.term) == (msg.leader, msg.term):
                current.resend()                 # a re-sent Open: frame again, if ready
                return
            if not outranks(msg.session, (msg.term, msg.leader),
                            (current.term, current.leader)):
                node.send_to(sender, P.Deposed(msg.session, current.leader, current.term))
                return
            current.closed = True                # superseded by a better claim
        if sender != node.node_id and self._share_of(sender) >= self._max_share():
            self.refuse("a leader past its share of this node's sessions")
            node.send_to(sender, P.Leave(msg.session, node.node_id,
                                         "busy: your share of this node's sessions is taken"))
            return
        member = MemberSession(msg, me=node.node_id, engine=node.engine, send=node.send_to,
                               fresh=node.fresh)
        member.term = msg.term
        self.member_of[msg.session] = member
        await member.open()

    def _share_of(self, leader: str) -> int:
        return (sum(1 for m in self.member_of.values() if m.leader == leader and not m.closed)
                + self.text.share_of(leader))

    def _max_share(self) -> int:
        slots = getattr(self.node.engine, "max_sessions", 16)
        return max(1, int(slots * PEER_SESSION_SHARE))

    async def session_message(self, msg: P.Token | P.Tokens | P.End | P.Resume,
                              sender: str) -> None:
        if msg.session in self.clients:
            self.to_client(msg, sender)
        if isinstance(msg, P.End):
            await self.text.end(msg, sender)
        elif isinstance(msg, P.Resume):
            await self.text.resume(msg, sender)
        member = self.member_of.get(msg.session)
        if member is None:
            if (isinstance(msg, (P.Token, P.Tokens)) and msg.session not in self.clients
                    and not self.text.running(msg.session) and sender != self.node.node_id):
                self.stray(msg, sender)
            return
        if member.taken_over or not member.follow(sender, msg.term):
            return
        if isinstance(msg, (P.Token, P.Tokens)):
            member.token(msg)
        elif isinstance(msg, P.Resume):
            member.resume(sender, msg.term)
        else:
            await member.end()
        if member.closed:
            if self.member_of.get(msg.session) is member:
                del self.member_of[msg.session]
            self.remember_leader(msg.session, member.leader, member.term)

    def stray(self, msg: Any, sender: str) -> None:
        """A leader's message (Token; Candidates or Commit) for a session this node is
        not (or no longer) in. A leader that this node knows was outranked learns it was
        deposed (it woke up after the answer ended); otherwise it learns this node is not
        a member (e.g. it restarted), so it stops waiting for a reply that will never
        come. (The claimer itself says only that: its own word deposes no one.)"""
        known = self.led_by.get(msg.session)
        if known is not None and known[0] not in (sender, self.node.node_id) and outranks(
                msg.session, (known[1], known[0]), (msg.term, sender)):
            self.node.send_to(sender, P.Deposed(msg.session, known[0], known[1]))
        else:
            self.node.send_to(sender, P.Leave(msg.session, self.node.node_id,
                                              "not a member of this session"))

    def remember_leader(self, session: str, leader: str, term: int = 0) -> None:
        """Who led a session this node was a member or origin of (for a client
        re-attaching late, and to tell a leader that wakes up late that it was deposed)."""
        self.led_by[session] = (leader, term)
        while len(self.led_by) > FINISHED_KEEP_COUNT:
            self.led_by.pop(next(iter(self.led_by)))

    async def sweep(self) -> None:
        """Free member sessions whose leader has said nothing for `MEMBER_IDLE_S` (it
        died with no one to take over, it was cut off, or it never meant to go on)."""
        now = time.monotonic()
        for session, member in list(self.member_of.items()):
            if member.taken_over or now - member.last_heard < MEMBER_IDLE_S:
                continue
            log.warning("session %s: nothing from leader %s for %.0fs; freeing it", session,
                        member.leader, now - member.last_heard)
            del self.member_of[session]
            await member.end()
            self.node.send_to(member.leader, P.Leave(session, self.node.node_id, "idle"))
        await self.text.sweep()

    # --- failover ---------------------------------------------------------------------

    def peer_gone(self, node_id: str) -> None:
        node = self.node
        for client in self.clients.values():
            if client.leader == node_id:
                client.claimed = False       # (should it come back restarted, no lease)
        self.text.peer_gone(node_id)
        for leader in self.leading.values():
            leader.member_lost(node_id)
        alive = {m.node_id for m in node.membership.alive()}
        for session, member in list(self.member_of.items()):
            if member.leader != node_id or member.closed or member.taken_over:
                continue
            nxt = successor(session, member.members, alive, node.node_id, member.origin)
            member.claimed = False
            if nxt.action == "abstain":
                log.warning("session %s: leader %s unreachable but so is most of the "
                            "session; not taking over", session, node_id)
            elif nxt.action == "take-over":
                member.taken_over = True
                node.spawn(self._take_over(member, alive))
            else:
                member.leader, member.claimed = nxt.leader, False
                log.info("session %s: leader %s gone; %s takes over", session, node_id,
                         nxt.leader)

    async def _take_over(self, member: MemberSession, alive: set[str]) -> None:
        node = self.node
        state = await member.state()          # no step in flight: state matches the cache
        term = state["term"] + 1
        member.leader, member.term = node.node_id, term
        peers = {m.node_id: m for m in node.membership.alive()}   # (who died meanwhile)
        members = [peers[i] for i in member.members if i in alive and i in peers]
        leader = self.leader_for(member.params)(
            session=member.session, origin=member.origin, params=member.params,
            members=members, me=node.me, engine=node.engine, send=node.send_to,
            keep=member.keep, resume_from=state, term=term, roster=set(member.members),
            **node.session_timeouts())
        client = self.clients.get(member.session)
        if client is not None:
            client.leader, client.term, client.leader_lost_at = node.node_id, term, None
        if member.origin not in alive:
            log.warning("session %s: its origin is gone too; waiting for a client to attach",
                        member.session)
        await self._run_leader(member.session, leader)
