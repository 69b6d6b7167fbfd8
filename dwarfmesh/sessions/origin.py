"""The origin role: a client's session, from its `Generate` to the last piece it streams.

A client's request arrives at any node, which becomes the session's **origin**: it elects
the leader from its view of the mesh (rendezvous hash over the largest same-tokenizer
group; `membership.plan_session` says which mode), sends it `Start`, and streams the
leader's pieces (`Token`s; a text session's `Commit`s arrive as Tokens too) back to the
client exactly once each, in step order, whatever the session's mode. A Start the leader
never acknowledges is sent again, and to the next leader by rank once the first one is
dead (with a later term, so the two can never both lead). A gap in the stream, or a
silent live leader, is asked for again (`Attach` from the first missing step). A client
whose node died re-attaches to another node of the session, which becomes the origin.

Owns: `ClientStream` (one per session this node streams to a client) and `OriginRole`,
the origin's half of `roles.SessionRoles` (which holds the tables it reads). Does not:
lead or join sessions.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from dwarfmesh.config import (
    FAILOVER_GRACE_S,
    HEARTBEAT_INTERVAL_S,
    OPEN_RESEND_S,
    PREFILL_TIMEOUT_S,
)
from dwarfmesh.mesh.membership import elect_leader, outranks, plan_session, successor
from dwarfmesh.sessions.deadlines import ORIGIN_PROBE_S, RESEND_S, START_ACK_S
from dwarfmesh.sessions.ports import NodePort
from dwarfmesh.wire import protocol as P

log = logging.getLogger(__name__)


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



class OriginRole:
    """The origin's half of the session roles (`roles.SessionRoles` holds the state)."""

    node: NodePort
    clients: dict[str, ClientStream]
    leading: dict[str, Any]
    member_of: dict[str, Any]
    finished: dict[str, tuple[float, list[Any]]]
    led_by: dict[str, tuple[str, int]]
    text: Any

    def generate(self, req: P.Generate, identity: bytes) -> None:
        node = self.node
        session = req.conversation or req.request
        client = self.clients.get(session)
        if client is not None:
            if client.request == req:            # the client sent it again: same answer
                client.identity = identity
                return
            node.reply_client(identity, P.Error(
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
            node.reply_client(identity, P.Error(msg.session, "unknown session"))
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
        node.reply_client(identity, P.Resume(msg.session, leader_id, msg.next_step, term))
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
        self.node.reply_client(client.identity, msg)
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
                    self.node.reply_client(client.identity, P.Error(
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
                self.node.reply_client(client.identity, P.Error(
                    session, "the session's leader stopped answering and no member took over"))

