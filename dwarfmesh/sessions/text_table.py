"""This node's table of text-level sessions (rank, fuse-text): led and joined, and failover.

Owns: which text sessions this node leads (`text_leader.TextLeaderSession`) and which it
is a member of (`text_member.TextMemberSession`); routing each text message to the one it
is for, once its sender may send it; who takes over when a text session's leader dies
(every member ranks the survivors by the same rendezvous hash, `membership.successor`;
the first takes over, the others wait for its `Resume`); freeing members whose leader
went silent. The client streams are the origin role's (`RolesPort`), one per session
whatever its mode. Does not: open sockets (`NodePort`), decide a session's mode.
"""

from __future__ import annotations

import logging
import time

from dwarfmesh.mesh.membership import SessionPlan, outranks
from dwarfmesh.sessions.deadlines import MEMBER_IDLE_S
from dwarfmesh.sessions.leader import PromptTooLong
from dwarfmesh.sessions.member import leader_died
from dwarfmesh.sessions.ports import NodePort, RolesPort
from dwarfmesh.sessions.text_leader import TextLeaderSession
from dwarfmesh.sessions.text_member import TextMemberSession
from dwarfmesh.wire.protocol import (
    Attach,
    Candidates,
    Commit,
    Deposed,
    End,
    Leave,
    Proposal,
    Resume,
    Scores,
    Start,
    TextFrame,
    TextOpen,
    Token,
)

log = logging.getLogger(__name__)


class TextTable:
    """This node's text-level sessions: those it leads and those it is a member of.

    `sender` is always the peer a message came from (see `router` and `roles`: authority)."""

    def __init__(self, node: NodePort, roles: RolesPort) -> None:
        self.node, self.roles = node, roles
        self.leading: dict[str, TextLeaderSession] = {}
        self.members: dict[str, TextMemberSession] = {}

    async def lead(self, start: Start, plan: SessionPlan) -> None:
        node = self.node
        await self._run(TextLeaderSession(
            session=start.session, origin=start.origin, params=start.params, kind=plan.kind,
            members=plan.group, me=node.me, engine=node.engine, send=node.send_to,
            prompt=start.prompt, messages=start.messages, keep=start.keep,
            excluded=plan.excluded, term=start.term, **node.session_timeouts()))

    async def _run(self, leader: TextLeaderSession) -> None:
        session = leader.session
        self.leading[session] = leader
        try:
            await leader.run()
        except Exception as exc:  # noqa: BLE001 - report any failure to the client, then log it
            if isinstance(exc, PromptTooLong):
                log.warning("session %s: %s", session, exc)
            else:
                log.exception("session %s failed", session)
            leader._to_members(End(session, f"error: {exc}", {}, leader.term), origin_too=True,
                               dropped_too=True)
        finally:
            if self.leading.get(session) is leader:
                del self.leading[session]
            member = self.members.get(session)
            if member is not None and member.taken_over:
                self._forget(member)
            if leader.deposed is None:
                self.roles.keep_finished(session, leader.sent)

    # --- what the rest of the node asks -------------------------------------------------

    def running(self, session: str) -> bool:
        member = self.members.get(session)
        return session in self.leading or (member is not None and not member.closed)

    def members_of(self, session: str) -> set[str]:
        member = self.members.get(session)
        return set(member.members) if member is not None else set()

    def term_of(self, session: str) -> int:
        leader, member = self.leading.get(session), self.members.get(session)
        return leader.term if leader is not None else member.term if member is not None else 0

    def share_of(self, leader: str) -> int:
        return sum(1 for m in self.members.values() if m.leader == leader and not m.closed)

    def leader_of(self, session: str) -> str:
        """Who leads `session` as far as this node knows ("" if it does not)."""
        if session in self.leading:
            return self.node.node_id
        member = self.members.get(session)
        return member.leader if member is not None else ""

    # --- messages -----------------------------------------------------------------------

    def reply(self, msg: Proposal | Scores | TextFrame, size: int, sender: str) -> None:
        leader = self.leading.get(msg.session)
        if leader is None:
            return
        if sender != msg.sender:
            self.node.refused("text reply sent for another node")
            return
        leader.on_reply(msg, size)

    async def on_candidates(self, msg: Candidates, sender: str) -> None:
        member = self._following(msg, sender)
        if member is not None:
            await member.candidates(msg)
            self._settle(member)

    async def on_commit(self, msg: Commit, sender: str) -> None:
        leader = self.leading.get(msg.session)
        if (leader is not None and msg.step >= leader.steps
                and sender in {m.node_id for m in leader.members}):
            leader.adopt(msg)            # from a member ahead of this new leader (resume)
            return
        if msg.session in self.roles.clients:
            # The origin streams committed text to its client.
            self.roles.to_client(Token(msg.session, msg.step, 0, msg.text_hash, msg.text,
                                       msg.final, msg.term), sender)
        member = self._following(msg, sender)
        if member is not None:
            await member.commit(msg)
            self._settle(member)

    def _following(self, msg: Candidates | Commit, sender: str) -> TextMemberSession | None:
        """This node's text member `msg` is for, if `sender` leads it. (A member that took
        over stays this leader's own local member: it is followed.) A message for a
        session this node is in nowhere is a stray: e.g. a deposed leader that woke up."""
        member = self.members.get(msg.session)
        if member is None:
            if (msg.session not in self.roles.clients and not self.running(msg.session)
                    and sender != self.node.node_id):
                self.roles.stray(msg, sender)
            return None
        return member if member.follow(sender, msg.term) else None

    def _settle(self, member: TextMemberSession) -> None:
        if member.closed and self.members.get(member.session) is member:
            self._forget(member)

    async def open(self, msg: TextOpen, sender: str) -> None:
        node = self.node
        if sender != msg.leader:
            node.refused("TextOpen from another node than its leader")
            return
        current = self.members.get(msg.session)
        if current is not None and not current.closed:
            if (current.leader, current.term) == (msg.leader, msg.term):
                current.last_heard = time.monotonic()
                current.again(Proposal if current.mode.proposes else TextFrame, 0)
                return
            if not outranks(msg.session, (msg.term, msg.leader),
                            (current.term, current.leader)):
                node.send_to(sender, Deposed(msg.session, current.leader, current.term))
                return
            current.closed = True                # superseded by a better claim
        if sender != node.node_id and self.roles.past_share(sender):
            node.refused("a leader past its share of this node's sessions")
            node.send_to(sender, Leave(msg.session, node.node_id,
                                       "busy: your share of this node's sessions is taken"))
            return
        member = TextMemberSession(msg, me=node.node_id, engine=node.engine,
                                   send=node.send_to)
        member.fresh = node.fresh
        self.members[msg.session] = member
        await member.open()

    async def end(self, msg: End, sender: str) -> None:
        member = self.members.get(msg.session)
        if member is not None and member.follow(sender, msg.term):
            self._forget(member)
            await member.end()

    def _forget(self, member: TextMemberSession) -> None:
        """A finished member: remember who led, for a client that re-attaches late."""
        if self.members.get(member.session) is member:
            del self.members[member.session]
        self.roles.remember_leader(member.session, member.leader, member.term)

    def leave(self, session: str, sender: str, reason: str) -> None:
        leader = self.leading.get(session)
        if leader is not None and sender in {m.node_id for m in leader.members}:
            log.warning("session %s: %s left: %s", session, sender, reason)
            leader.member_lost(sender)

    def deposed(self, msg: Deposed, sender: str) -> None:
        leader = self.leading.get(msg.session)
        if leader is not None:
            leader.on_deposed(msg, sender)

    def cancel(self, session: str, sender: str) -> None:
        leader = self.leading.get(session)
        if leader is not None and sender == leader.origin:
            leader.cancel()

    async def resume(self, msg: Resume, sender: str) -> None:
        member = self.members.get(msg.session)
        if member is not None and sender == msg.leader and member.follow(sender, msg.term):
            await member.resume(msg)
            if member.closed:
                self._forget(member)

    def attach(self, msg: Attach) -> bool:
        """A new origin wants the Commits from `msg.next_step` (the leader's side)."""
        leader = self.leading.get(msg.session)
        if leader is not None:
            leader.set_origin(msg.origin, msg.next_step)
        return leader is not None

    async def sweep(self) -> None:
        """Free member sessions whose leader has said nothing for `MEMBER_IDLE_S`."""
        now = time.monotonic()
        for member in list(self.members.values()):
            if member.taken_over or now - member.last_heard < MEMBER_IDLE_S:
                continue
            if member.leader == self.node.node_id and member.session in self.leading:
                continue     # this node's own member: its leader (here) is alive; a long
                #              first step (prefill) sends it nothing to hear
            self._forget(member)
            await member.leader_gone(f"nothing from it for {now - member.last_heard:.0f}s")
            self.node.send_to(member.leader, Leave(member.session, self.node.node_id, "idle"))

    # --- failover -----------------------------------------------------------------------

    def peer_gone(self, node_id: str) -> None:
        node = self.node
        for leader in self.leading.values():
            leader.member_lost(node_id)
        alive = {m.node_id for m in node.membership.alive()}
        for member in list(self.members.values()):
            if member.leader != node_id or member.closed or member.taken_over:
                continue
            if leader_died(member, node_id, alive, node.node_id):
                node.spawn(self._take_over(member, alive))

    async def _take_over(self, member: TextMemberSession, alive: set[str]) -> None:
        node = self.node
        async with member._lock:          # no step in flight: its text is what was committed
            resume = member.resume_state()
            term = member.term + 1
            member.leader, member.term = node.node_id, term
        peers = {m.node_id: m for m in node.membership.alive()}
        members = [peers[i] for i in member.members if i in alive and i in peers]
        m = member.open_msg
        log.warning("session %s: leader gone; taking over at step %d (term %d) with %s",
                    member.session, member.step, term, ", ".join(x.name for x in members))
        client = self.roles.clients.get(member.session)
        if client is not None:
            client.leader, client.term, client.leader_lost_at = node.node_id, term, None
        leader = TextLeaderSession(
            session=member.session, origin=member.origin, params=member.params,
            kind=member.mode, members=members,
            me=node.me, engine=node.engine, send=node.send_to, prompt=m.prompt,
            messages=m.messages, keep=member.keep, resume=resume, term=term,
            roster=set(member.members),
            **node.session_timeouts())
        await self._run(leader)
