"""One node: wires the engine, transport, discovery, membership and sessions together.

A node plays three roles at once, per session:
- **origin** for the clients connected to it (`generate`, `peers`, `chat`): it elects the
  session's leader from its view of the mesh, sends it `Start`, and streams the leader's
  `Token`s back to the client;
- **leader** of the sessions the rendezvous hash gives it (`session.LeaderSession`);
- **member** of every session whose leader sends it `Open` (`session.MemberSession`).

Peers are found by mDNS (`discovery`) and by static `--peer` addresses; both only give an
address to dial. Every heartbeat interval the node sends its `Hello` to every address it
dials; a peer silent for `LIVENESS` intervals is dropped and every session it was in goes
on without it. Long work (prefill, steps) runs in tasks, never in the receive loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from dwarfmesh import protocol as P
from dwarfmesh.config import (DEFAULT_PORT, HEARTBEAT_INTERVAL_S, PREFILL_TIMEOUT_S,
                              PROTOCOL_VERSION, default_node_name, node_id_for)
from dwarfmesh.membership import Member, Membership, elect_leader, fusion_group
from dwarfmesh.session import LeaderSession, MemberSession
from dwarfmesh.transport import Origin, Transport

log = logging.getLogger(__name__)

_LOCAL = Origin("local", None, "", None, 0)
SWEEP_EVERY_BEATS = 30          # look for idle conversation caches every 30 heartbeats


@dataclass
class NodeOptions:
    model: str
    name: str = field(default_factory=default_node_name)
    host: str = "0.0.0.0"
    port: int = DEFAULT_PORT
    peers: list[str] = field(default_factory=list)
    mdns: bool = True
    interfaces: list[str] | None = None
    weight: float = 1.0
    step_timeout_s: float | None = None


@dataclass
class _ClientStream:
    identity: bytes
    request: str
    session: str
    leader: str
    last_heard: float


class Node:
    def __init__(self, options: NodeOptions, engine: Any) -> None:
        self.opts = options
        self.engine = engine
        self.node_id = node_id_for(options.name)
        self.transport = Transport(host=options.host, port=options.port, handler=self._dispatch)
        self.membership: Membership | None = None
        self.discovery: Any = None
        self._targets: dict[str, str] = {}            # address -> "static" | "mdns" | "learned"
        self._addr_of: dict[str, str] = {}            # node_id -> address we dial it on
        self._leading: dict[str, LeaderSession] = {}
        self._member_of: dict[str, MemberSession] = {}
        self._clients: dict[str, _ClientStream] = {}   # session -> client stream
        self._tasks: set[asyncio.Task] = set()
        self._stopped = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def me(self) -> Member:
        return self.membership.me

    async def start(self) -> None:
        port = await self.transport.start()
        host = self.opts.host if self.opts.host not in ("", "0.0.0.0") else ""
        me = Member(self.node_id, self.opts.name, self.engine.model_name, self.engine.fingerprint,
                    self.engine.vocab_size, f"{host}:{port}", self.opts.weight)
        self.membership = Membership(me=me)
        for addr in self.opts.peers:
            self._targets[addr] = "static"
        if self.opts.mdns:
            await self._start_discovery(port)
        self._spawn(self._heartbeat_loop())
        log.info("node %s (%s) serving %s on port %d%s", self.opts.name, self.node_id,
                 self.engine.model_name, port, "" if self.opts.mdns else " (mDNS off)")

    async def _start_discovery(self, port: int) -> None:
        from dwarfmesh.discovery import Discovery, PeerRecord

        record = PeerRecord(self.node_id, self.opts.name, self.engine.model_name,
                            self.engine.fingerprint, self.engine.vocab_size, PROTOCOL_VERSION,
                            self.opts.host, port)
        self.discovery = Discovery(record, on_up=self._on_mdns_up, on_down=self._on_mdns_down,
                                   interfaces=self.opts.interfaces)
        await self.discovery.start()

    async def stop(self) -> None:
        self._stopped.set()
        if self.discovery is not None:
            await self.discovery.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.transport.close()
        self.engine.shutdown()

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task failed: %r", task.exception(), exc_info=task.exception())

    # --- peers ----------------------------------------------------------------------------

    def _hello(self) -> P.Hello:
        me = self.me
        return P.Hello(me.node_id, me.name, me.model, me.fingerprint, me.vocab_size,
                       PROTOCOL_VERSION, me.address, me.weight, sorted(self._leading),
                       sorted(m.address for m in self.membership.peers.values()))

    def _dial(self, address: str) -> None:
        self.transport.connect(address)
        self.transport.send(address, self._hello())

    async def _heartbeat_loop(self) -> None:
        beats = 0
        while True:
            for address in list(self._targets):
                self._dial(address)
            for dead in self.membership.expire(time.monotonic()):
                self._peer_gone(dead.node_id, "silent past the liveness window")
            beats += 1
            if beats % SWEEP_EVERY_BEATS == 0:
                for conv in await self.engine.sweep():
                    log.info("freed idle conversation %s", conv)
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)

    def _peer_gone(self, node_id: str, why: str) -> None:
        member = self.membership.peer_down(node_id)
        address = self._addr_of.pop(node_id, None)
        if member is not None:
            log.warning("peer %s (%s) left: %s", member.name, node_id, why)
        if address is not None and self._targets.get(address) == "learned":
            del self._targets[address]
            self.transport.disconnect(address)
        for session in self._leading.values():
            session.member_lost(node_id)

    def _on_mdns_up(self, record: Any) -> None:
        address = record.address()
        if record.node_id != self.node_id and address not in self._targets:
            log.info("mDNS: found %s (%s) at %s", record.name, record.model, address)
            self._targets[address] = "mdns"
            self._dial(address)

    def _on_mdns_down(self, node_id: str) -> None:
        address = self._addr_of.get(node_id)
        if address is not None and self._targets.get(address) == "mdns":
            self._targets[address] = "learned"
        self._peer_gone(node_id, "mDNS goodbye")

    def _on_hello(self, hello: P.Hello, origin: Origin) -> None:
        refusal = P.check_version(hello)
        if refusal is not None:
            log.warning("refusing %s: %s", hello.name, refusal)
            self.transport.dropped["refused: version"] += 1
            if origin.identity is not None:
                self.transport.reply(origin.identity, P.Refuse(self.node_id, refusal))
            return
        if hello.node_id == self.node_id:
            return
        host, _, port = hello.address.rpartition(":")
        address = hello.address if host else f"{origin.peer_ip}:{port}"
        member = Member(hello.node_id, hello.name, hello.model, hello.fingerprint,
                        hello.vocab_size, address, hello.weight, tuple(hello.leading))
        if self.membership.peer_up(member, time.monotonic()):
            log.info("peer %s joined: %s at %s", hello.name, hello.model, address)
            if origin.identity is not None:
                self.transport.reply(origin.identity, self._hello())
        # Gossip: a peer's peers are dialed too, so `--peer` on one node builds a full mesh.
        for addr in hello.peers:
            if addr.rpartition(":")[0] and addr not in self._targets and addr != self.me.address:
                self._targets[addr] = "learned"
                self._dial(addr)
        old = self._addr_of.get(hello.node_id)
        if old is None or not self.transport.connected(old):
            self._addr_of[hello.node_id] = address
            self._targets.setdefault(address, "learned")
            if not self.transport.connected(address):
                self._dial(address)

    def send_to(self, node_id: str, msg: Any) -> int:
        """Send to a node by id; a message to this node itself is dispatched locally."""
        if node_id == self.node_id:
            self._spawn(self._handle(msg, _LOCAL))
            return 0
        address = self._addr_of.get(node_id)
        return self.transport.send(address, msg) if address else 0

    # --- dispatch -------------------------------------------------------------------------

    def _dispatch(self, msg: Any, origin: Origin) -> None:
        if isinstance(msg, P.Hello):
            self._on_hello(msg, origin)
        elif isinstance(msg, P.Frame):
            session = self._leading.get(msg.session)
            if session is not None:
                session.on_frame(msg, origin.size)
        elif isinstance(msg, P.Leave):
            session = self._leading.get(msg.session)
            if session is not None:
                log.warning("session %s: %s left: %s", msg.session, msg.sender, msg.reason)
                session.member_lost(msg.sender)
        else:
            self._spawn(self._handle(msg, origin))

    async def _handle(self, msg: Any, origin: Origin) -> None:
        if isinstance(msg, P.Refuse):
            log.error("peer %s refused us: %s", msg.node_id, msg.reason)
        elif isinstance(msg, P.Start):
            await self._lead(msg)
        elif isinstance(msg, P.Open):
            member = MemberSession(session=msg.session, leader=msg.leader, me=self.node_id,
                                   engine=self.engine, send=self.send_to, top_k=msg.top_k,
                                   keep=msg.keep)
            self._member_of[msg.session] = member
            await member.open(msg.prompt_ids)
        elif isinstance(msg, (P.Token, P.End)):
            await self._on_session_message(msg)
        elif isinstance(msg, P.Cancel):
            self._cancel(msg.request)
        elif isinstance(msg, P.PeersRequest) and origin.identity is not None:
            self.transport.reply(origin.identity, P.PeersReply(msg.request, self.peer_list()))
        elif isinstance(msg, P.Generate) and origin.identity is not None:
            self._start_for_client(msg, origin.identity)

    async def _on_session_message(self, msg: P.Token | P.End) -> None:
        client = self._clients.get(msg.session)
        if client is not None:
            client.last_heard = time.monotonic()
            self.transport.reply(client.identity, replace(msg, session=client.request))
            if isinstance(msg, P.End):
                del self._clients[msg.session]
        member = self._member_of.get(msg.session)
        if member is not None:
            if isinstance(msg, P.Token):
                await member.token(msg)
            else:
                await member.end()
            if member.closed:
                self._member_of.pop(msg.session, None)

    # --- sessions -------------------------------------------------------------------------

    def _start_for_client(self, req: P.Generate, identity: bytes) -> None:
        session = req.conversation or uuid.uuid4().hex[:16]
        if session in self._clients:
            self.transport.reply(identity, P.Error(
                req.request, f"conversation {session} is already answering; wait for it"))
            return
        group, excluded = fusion_group(self.membership.alive())
        if not group:
            self.transport.reply(identity, P.Error(req.request, "no members in the mesh"))
            return
        leader = elect_leader(session, group)
        for member, why in excluded:
            log.warning("session %s: leaving out %s", session, why)
        log.info("session %s: leader %s, members %s", session, leader.name,
                 ", ".join(m.name for m in group))
        self._clients[session] = _ClientStream(identity, req.request, session, leader.node_id,
                                               time.monotonic())
        self.send_to(leader.node_id, P.Start(session, self.node_id, req.prompt, req.params,
                                             req.messages, bool(req.conversation)))
        self._spawn(self._watch_client(session))

    async def _watch_client(self, session: str) -> None:
        """Tell the client if its leader goes silent, rather than letting it hang."""
        while session in self._clients:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            client = self._clients.get(session)
            if client is None:
                return
            leader_alive = (client.leader == self.node_id
                            or client.leader in self.membership.peers)
            if not leader_alive or time.monotonic() - client.last_heard > PREFILL_TIMEOUT_S:
                del self._clients[session]
                self.transport.reply(client.identity, P.Error(
                    client.request, "the session's leader stopped answering"))

    async def _lead(self, start: P.Start) -> None:
        group, excluded = fusion_group(self.membership.alive())
        if all(m.node_id != self.node_id for m in group):
            group, excluded = [self.me], excluded
        kwargs = {}
        if self.opts.step_timeout_s:
            kwargs["step_timeout_s"] = self.opts.step_timeout_s
        if start.session in self._leading:
            self.send_to(start.origin, P.End(start.session, "error: session already running", {}))
            return
        leader = LeaderSession(session=start.session, origin=start.origin, prompt=start.prompt,
                               params=start.params, members=group, me=self.me,
                               engine=self.engine, send=self.send_to, messages=start.messages,
                               keep=start.keep, excluded=excluded, **kwargs)
        self._leading[start.session] = leader
        try:
            await leader.run()
        except Exception as exc:  # noqa: BLE001 - report any failure to the client, then log it
            log.exception("session %s failed", start.session)
            self.send_to(start.origin, P.End(start.session, f"error: {exc}", {}))
            for m in group:
                if m.node_id != self.node_id:
                    self.send_to(m.node_id, P.End(start.session, "error", {}))
        finally:
            self._leading.pop(start.session, None)

    def _cancel(self, request_or_session: str) -> None:
        for session, client in self._clients.items():
            if client.request == request_or_session:
                self.send_to(client.leader, P.Cancel(session))
                return
        leader = self._leading.get(request_or_session)
        if leader is not None:
            leader.cancel()

    # --- introspection --------------------------------------------------------------------

    def peer_list(self) -> list[dict[str, Any]]:
        out = []
        for m in self.membership.alive():
            me = m.node_id == self.node_id
            entry = {
                "node_id": m.node_id, "name": m.name, "model": m.model,
                "address": m.address,   # ":port" = the address the client reached
                "fingerprint": m.fingerprint, "vocab_size": m.vocab_size, "weight": m.weight,
                "leader_of": sorted(self._leading) if me else list(m.leading),
                "self": me,
            }
            if me:
                entry["stats"] = {**self.transport.stats(), "sessions_led": len(self._leading),
                                  "sessions_member": len(self._member_of)}
            out.append(entry)
        return out
