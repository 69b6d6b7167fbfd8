"""The session roles a node plays: origin for its clients, leader, member — and failover.

- **origin**: `origin.OriginRole` (the client's stream, whatever the session's mode).
- **leader**: runs `leader.LeaderSession` (or `speculate.SpecLeaderSession`); a text
  session, `text_table.TextTable`'s `text_leader.TextLeaderSession`.
- **member**: runs `member.MemberSession` (text: `text_member.TextMemberSession`).
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

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from dwarfmesh.mesh.membership import outranks, plan_session
from dwarfmesh.sessions.deadlines import MEMBER_IDLE_S
from dwarfmesh.sessions.drafting import DraftLength
from dwarfmesh.sessions.leader import LeaderSession, PromptTooLong
from dwarfmesh.sessions.member import MemberSession, leader_died
from dwarfmesh.sessions.origin import ClientStream, OriginRole
from dwarfmesh.sessions.ports import NodePort
from dwarfmesh.sessions.speculate import SpecLeaderSession
from dwarfmesh.sessions.text_table import TextTable
from dwarfmesh.wire import protocol as P

log = logging.getLogger(__name__)

FINISHED_KEEP_S = 120.0        # a leader keeps a finished answer this long for re-attaching
FINISHED_KEEP_COUNT = 256      # a member remembers who led this many finished sessions
PEER_SESSION_SHARE = 0.5       # most of this node's session slots one leader may hold


class SessionRoles(OriginRole):
    def __init__(self, node: NodePort) -> None:
        self.node = node
        self.leading: dict[str, LeaderSession] = {}
        self.member_of: dict[str, MemberSession] = {}
        self.clients: dict[str, ClientStream] = {}
        # Recently finished sessions, so a client that re-attaches late still gets its
        # answer: as leader, what was streamed; as member, who led.
        self.finished: dict[str, tuple[float, list[Any]]] = {}
        self.spec_memory: dict[frozenset[str], DraftLength] = {}   # speculate auto's costs
        self.led_by: dict[str, tuple[str, int]] = {}   # session -> (leader, term)
        self.text = TextTable(node, self)   # sessions across tokenizers (rank, fuse-text)

    def refuse(self, why: str) -> None:
        self.node.refused(why)

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
        log.info("session %s: %s (%s)", start.session, plan.kind.value, plan.why)
        if plan.kind.is_text:
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
        if sender != node.node_id and self.past_share(sender):
            self.refuse("a leader past its share of this node's sessions")
            node.send_to(sender, P.Leave(msg.session, node.node_id,
                                         "busy: your share of this node's sessions is taken"))
            return
        member = MemberSession(msg, me=node.node_id, engine=node.engine, send=node.send_to,
                               fresh=node.fresh)
        member.term = msg.term
        self.member_of[msg.session] = member
        await member.open()

    def past_share(self, leader: str) -> bool:
        return self._share_of(leader) >= self._max_share()

    def _share_of(self, leader: str) -> int:
        return (sum(1 for m in self.member_of.values() if m.leader == leader and not m.closed)
                + self.text.share_of(leader))

    def _max_share(self) -> int:
        slots = getattr(self.node.engine, "max_sessions", 16)
        return max(1, int(slots * PEER_SESSION_SHARE))

    # A leader's Token(s), End and Resume reach this node as the session's origin (the
    # client's stream), as an id member, or as a text member (End, Resume), in that order.

    def on_tokens(self, msg: P.Token | P.Tokens, sender: str) -> None:
        self._to_origin(msg, sender)
        member = self._following(msg, sender, stray=True)
        if member is not None:
            member.token(msg)
            self._settle(member)

    async def on_end(self, msg: P.End, sender: str) -> None:
        self._to_origin(msg, sender)
        await self.text.end(msg, sender)
        member = self._following(msg, sender)
        if member is not None:
            await member.end()
            self._settle(member)

    async def on_resume(self, msg: P.Resume, sender: str) -> None:
        self._to_origin(msg, sender)
        await self.text.resume(msg, sender)
        member = self._following(msg, sender)
        if member is not None:
            member.resume(sender, msg.term)
            self._settle(member)

    def _to_origin(self, msg: Any, sender: str) -> None:
        if msg.session in self.clients:
            self.to_client(msg, sender)

    def _following(self, msg: Any, sender: str, stray: bool = False) -> MemberSession | None:
        """This node's member session `msg` is for, if `sender` leads it. A Token for a
        session this node is in nowhere is a stray (its sender learns so)."""
        member = self.member_of.get(msg.session)
        if member is None:
            if (stray and msg.session not in self.clients
                    and not self.text.running(msg.session) and sender != self.node.node_id):
                self.stray(msg, sender)
            return None
        if member.taken_over or not member.follow(sender, msg.term):
            return None
        return member

    def _settle(self, member: MemberSession) -> None:
        """A member that closed is forgotten; who led it is remembered (a late Attach)."""
        if member.closed:
            if self.member_of.get(member.session) is member:
                del self.member_of[member.session]
            self.remember_leader(member.session, member.leader, member.term)

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
        for member in list(self.member_of.values()):
            if member.leader != node_id or member.closed or member.taken_over:
                continue
            if leader_died(member, node_id, alive, node.node_id):
                node.spawn(self._take_over(member, alive))

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
