"""The session roles a node plays: origin for its clients, leader, member — and failover.

- **origin**: a client's `Generate` arrives; the origin elects the leader from its view
  of the mesh (rendezvous hash over the largest same-tokenizer group), sends it `Start`,
  and streams `Token`s back to the client exactly once each, in step order.
- **leader**: runs `session.LeaderSession`.
- **member**: runs `member.MemberSession`.
- **failover**: when a session's leader dies, every member ranks the session's surviving
  members by the same rendezvous hash; the first one takes over (`LeaderSession` with
  `resume_from`), the others wait for its `Resume`. A client whose node died re-attaches
  to another node (`Attach`), which becomes the origin and streams from `next_step`.

The node owns the sockets and the membership; this class owns the session tables.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from dwarfmesh import protocol as P
from dwarfmesh.config import (
    FAILOVER_GRACE_S,
    HEARTBEAT_INTERVAL_S,
    OPEN_RESEND_S,
    PREFILL_TIMEOUT_S,
)
from dwarfmesh.member import MemberSession
from dwarfmesh.membership import (
    elect_leader,
    plan_session,  # issue 6: text-level sessions
    rank_for_session,
)
from dwarfmesh.rank_member import TextSessions  # issue 6
from dwarfmesh.session import LeaderSession, PromptTooLong

log = logging.getLogger(__name__)

FINISHED_KEEP_S = 120.0        # a leader keeps a finished answer this long for re-attaching
FINISHED_KEEP_COUNT = 256      # a member remembers who led this many finished sessions


@dataclass
class ClientStream:
    identity: bytes
    session: str
    leader: str
    next_step: int
    last_heard: float
    leader_lost_at: float | None = None
    start: Any = None              # the Start message, re-sent until the leader acknowledges
    acked: bool = False


class SessionRoles:
    def __init__(self, node: Any) -> None:
        self.node = node
        self.leading: dict[str, LeaderSession] = {}
        self.member_of: dict[str, MemberSession] = {}
        self.clients: dict[str, ClientStream] = {}
        # Recently finished sessions, so a client that re-attaches late still gets its
        # answer: as leader, what was streamed; as member, who led.
        self.finished: dict[str, tuple[float, list[Any]]] = {}
        self.led_by: dict[str, str] = {}
        self.text = TextSessions(node)   # issue 6: sessions across tokenizers

    # --- origin -----------------------------------------------------------------------

    def generate(self, req: P.Generate, identity: bytes) -> None:
        node = self.node
        session = req.conversation or req.request
        if session in self.clients:
            node.transport.reply(identity, P.Error(
                session, f"session {session} is already answering; wait for it"))
            return
        plan = plan_session(req.params, node.membership.alive())   # issue 6: mode
        group, excluded = plan.group, plan.excluded
        leader = elect_leader(session, group)
        for _member, why in excluded:
            log.warning("session %s: leaving out %s", session, why)
        log.info("session %s: leader %s, members %s", session, leader.name,
                 ", ".join(m.name for m in group))
        start = P.Start(session, node.node_id, req.prompt, req.params, req.messages,
                        bool(req.conversation))
        self.clients[session] = ClientStream(identity, session, leader.node_id, 0,
                                             time.monotonic(), start=start)
        node.send_to(leader.node_id, start)
        node.spawn(self._watch_client(session))

    def attach(self, msg: P.Attach, identity: bytes) -> None:
        """A client re-attaches here after its node died: become the session's origin."""
        node = self.node
        member = self.member_of.get(msg.session)
        leader_id = (node.node_id if msg.session in self.leading or msg.session in self.finished
                     else member.leader if member is not None
                     else self.text.leader_of(msg.session)           # issue 6: text sessions
                     or self.led_by.get(msg.session, ""))
        if not leader_id:
            node.transport.reply(identity, P.Error(msg.session, "unknown session"))
            return
        self.clients[msg.session] = ClientStream(identity, msg.session, leader_id,
                                                 msg.next_step, time.monotonic())
        node.send_to(leader_id, P.Attach(msg.session, node.node_id, msg.next_step))
        node.spawn(self._watch_client(msg.session))

    def to_client(self, msg: P.Token | P.End | P.Resume) -> None:
        client = self.clients.get(msg.session)
        if client is None:
            return
        client.last_heard = time.monotonic()
        client.acked = True
        if isinstance(msg, P.Resume):
            client.leader, client.leader_lost_at = msg.leader, None
            return
        if isinstance(msg, P.Token):
            if msg.step != client.next_step:
                return                   # a token already streamed (resent by a new leader)
            client.next_step += 1
        if isinstance(msg, P.End):
            msg.summary.setdefault("mode", "fuse-ids")   # issue 6: text sessions set theirs
        self.node.transport.reply(client.identity, msg)
        if isinstance(msg, P.End):
            del self.clients[msg.session]

    async def _watch_client(self, session: str) -> None:
        """Tell the client when its leader is gone for good, rather than letting it hang."""
        while session in self.clients:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            client = self.clients.get(session)
            if client is None:
                return
            now = time.monotonic()
            if not client.acked and now - client.last_heard > OPEN_RESEND_S:
                # The Start may have been lost (e.g. the leader had just restarted): again.
                client.last_heard = now
                self.node.send_to(client.leader, client.start)
            alive = (client.leader == self.node.node_id
                     or client.leader in self.node.membership.peers)
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

    async def lead(self, start: P.Start) -> None:
        node = self.node
        # Acknowledge (the origin re-sends an unacknowledged Start): "I lead it from step 0".
        node.send_to(start.origin, P.Resume(start.session, node.node_id, 0))
        if start.session in self.leading or start.session in self.text_leading():
            return                                   # a re-sent Start: already running
        plan = plan_session(start.params, node.membership.alive())  # issue 6: mode
        log.info("session %s: %s (%s)", start.session, plan.kind, plan.why)  # issue 6
        if plan.kind != "fuse-ids":                                   # issue 6
            await self.text.lead(start, plan)                         # issue 6
            return                                                    # issue 6
        group, excluded = plan.group, plan.excluded
        if all(m.node_id != node.node_id for m in group):
            group = [node.me]
        await self._run_leader(start.session, LeaderSession(
            session=start.session, origin=start.origin, prompt=start.prompt,
            params=start.params, members=group, me=node.me, engine=node.engine,
            send=node.send_to, messages=start.messages, keep=start.keep, excluded=excluded,
            **node.session_timeouts()))

    def text_leading(self) -> dict[str, Any]:
        """Sessions this node leads on the text path (issue 6), if that path exists."""
        return getattr(getattr(self, "text", None), "leading", {}) or {}

    async def _run_leader(self, session: str, leader: LeaderSession) -> None:
        self.leading[session] = leader
        try:
            await leader.run()
        except Exception as exc:  # noqa: BLE001 - report any failure to the client, then log it
            if isinstance(exc, PromptTooLong):
                log.warning("session %s: %s", session, exc)
            else:
                log.exception("session %s failed", session)
            self.node.send_to(leader.origin, P.End(session, f"error: {exc}", {}))
            for m in leader.members:
                if m.node_id != self.node.node_id:
                    self.node.send_to(m.node_id, P.End(session, "error", {}))
        finally:
            self.leading.pop(session, None)
            self.member_of.pop(session, None)
            self.keep_finished(session, leader.sent)

    def keep_finished(self, session: str, sent: list[Any]) -> None:
        """Keep what a finished session streamed, for a client that re-attaches late."""
        now = time.monotonic()
        self.finished[session] = (now, sent)
        for key, (t, _) in list(self.finished.items()):
            if now - t > FINISHED_KEEP_S:
                del self.finished[key]

    def frame(self, msg: P.Frame, size: int) -> None:
        leader = self.leading.get(msg.session)
        if leader is not None:
            leader.on_frame(msg, size)

    def leave(self, msg: P.Leave) -> None:
        self.text.leave(msg.session, msg.sender, msg.reason)   # issue 6
        leader = self.leading.get(msg.session)
        if leader is not None:
            log.warning("session %s: %s left: %s", msg.session, msg.sender, msg.reason)
            leader.member_lost(msg.sender)

    def leader_attach(self, msg: P.Attach) -> None:
        leader = self.leading.get(msg.session)
        log.info("session %s: origin moves to %s at step %d", msg.session, msg.origin,
                 msg.next_step)
        if leader is not None:
            leader.set_origin(msg.origin, msg.next_step)
        elif self.text.attach(msg):          # issue 6: a text session this node leads
            pass
        elif msg.session in self.finished:
            for sent in self.finished[msg.session][1][msg.next_step:]:
                self.node.send_to(msg.origin, sent)

    def cancel(self, session: str) -> None:
        client = self.clients.get(session)
        if client is not None and client.leader != self.node.node_id:
            self.node.send_to(client.leader, P.Cancel(session))
            return
        leader = self.leading.get(session)
        if leader is not None:
            leader.cancel()
        self.text.cancel(session)   # issue 6

    # --- member -----------------------------------------------------------------------

    async def open(self, msg: P.Open) -> None:
        current = self.member_of.get(msg.session)
        if current is not None and not current.closed and current.leader == msg.leader:
            return                                   # a re-sent Open: already prefilling
        member = MemberSession(msg, me=self.node.node_id, engine=self.node.engine,
                               send=self.node.send_to)
        self.member_of[msg.session] = member
        await member.open()

    async def session_message(self, msg: P.Token | P.End | P.Resume) -> None:
        self.to_client(msg)
        if isinstance(msg, P.End):
            await self.text.end(msg)   # issue 6: a text member frees its state
        elif isinstance(msg, P.Resume):
            await self.text.resume(msg)   # issue 6: a text session's new leader
        member = self.member_of.get(msg.session)
        if member is None or member.taken_over:
            return
        if isinstance(msg, P.Token):
            member.token(msg)
        elif isinstance(msg, P.Resume):
            member.resume(msg.leader)
        else:
            await member.end()
        if member.closed:
            self.member_of.pop(msg.session, None)
            self.remember_leader(msg.session, member.leader)

    def remember_leader(self, session: str, leader: str) -> None:
        """Who led a session this node was a member of (for a client re-attaching late)."""
        self.led_by[session] = leader
        while len(self.led_by) > FINISHED_KEEP_COUNT:
            self.led_by.pop(next(iter(self.led_by)))

    # --- failover ---------------------------------------------------------------------

    def peer_gone(self, node_id: str) -> None:
        node = self.node
        self.text.peer_gone(node_id)   # issue 6
        for leader in self.leading.values():
            leader.member_lost(node_id)
        alive = {m.node_id for m in node.membership.alive()}
        for session, member in list(self.member_of.items()):
            if member.leader != node_id or member.closed or member.taken_over:
                continue
            ranked = [m.node_id for m in rank_for_session(session, _stubs(member.members))
                      if m.node_id in alive]
            if not ranked:
                continue
            if len(member.members) > 2 and 2 * len(ranked) < len(member.members):
                # We see less than half of the session: we are probably the ones cut off,
                # and taking over would make a second leader. Leave it to the majority.
                log.warning("session %s: leader %s unreachable but so is most of the "
                            "session; not taking over", session, node_id)
                continue
            if ranked[0] == node.node_id:
                self._take_over(member, alive)
            else:
                member.leader = ranked[0]
                log.info("session %s: leader %s gone; %s takes over", session, node_id,
                         ranked[0])

    def _take_over(self, member: MemberSession, alive: set[str]) -> None:
        node = self.node
        member.taken_over = True
        peers = {m.node_id: m for m in node.membership.alive()}
        members = [peers[i] for i in member.members if i in alive and i in peers]
        leader = LeaderSession(
            session=member.session, origin=member.origin, params=member.params,
            members=members, me=node.me, engine=node.engine, send=node.send_to,
            keep=member.keep, resume_from=member.state(), **node.session_timeouts())
        if member.origin not in alive:
            log.warning("session %s: its origin is gone too; waiting for a client to attach",
                        member.session)
        node.spawn(self._run_leader(member.session, leader))


def _stubs(ids: list[str]) -> list[Any]:
    """rank_for_session wants objects with a node_id; give it just that."""
    return [_Id(i) for i in ids]


@dataclass(frozen=True)
class _Id:
    node_id: str
