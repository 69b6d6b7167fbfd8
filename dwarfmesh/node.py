"""One node: wires the engine, transport, discovery, membership and sessions together.

A node plays three roles at once, per session:
- **origin** for the clients connected to it (`generate`, `peers`, `chat`): it elects the
  session's leader from its view of the mesh, sends it `Start`, and streams the leader's
  `Token`s back to the client;
- **leader** of the sessions the rendezvous hash gives it (`leader.LeaderSession`);
- **member** of every session whose leader sends it `Open` (`member.MemberSession`).

Peers are found by mDNS (`discovery`) and by static `--peer` addresses; both only give an
address to dial. Every heartbeat interval the node sends its `Hello` to every address it
dials; a peer silent for `LIVENESS` intervals is dropped and every session it was in goes
on without it. Only the heartbeats decide who is alive: an mDNS goodbye (which multicast
loss or a forged packet can produce) only makes the node say Hello at once. A peer whose
Hello carries a new incarnation restarted: it is dropped from every session and joins
afresh. Long work (prefill, steps) runs in tasks, never in the receive loop.

Nothing but a Hello counts from a connection that has not said Hello: every other node
message is dropped and counted (`refused`), and the sender handed to the session tables
is the peer the message came from, never a field of the message (`sessions.router`).

A Hello on the ROUTER is answered with this node's Hello (at most every
`HELLO_ANSWER_S` per peer), which reaches the sender on the DEALER it dialled: that is
how a node learns that a peer listens where it sends. Only such verified peers are listed,
gossiped and planned into sessions (`Membership.reachable`): a stranger that only sends
Hellos, with any model and any address, changes no session.

Owns: one node's sockets, peers, heartbeats and identity, and the wiring of engine,
transport, discovery, membership and session tables. Does not: decide anything about a
session (`sessions`): every message goes to the router.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import zmq

from dwarfmesh.config import (
    DEFAULT_PORT,
    HEARTBEAT_INTERVAL_S,
    PROTOCOL_VERSION,
    default_node_name,
    node_id_for,
)
from dwarfmesh.mesh.gossip import DialPolicy
from dwarfmesh.mesh.membership import Member, Membership
from dwarfmesh.sessions import router
from dwarfmesh.sessions.deadlines import LEASE_S, own_stall
from dwarfmesh.sessions.roles import SessionRoles
from dwarfmesh.sessions.router import Received
from dwarfmesh.wire import protocol as P
from dwarfmesh.wire.bounds import MAX_GOSSIP, MAX_LEADING
from dwarfmesh.wire.transport import Origin, Transport

log = logging.getLogger(__name__)

_LOCAL = Origin("local", None, "", None, 0)
MAX_IDENTITIES = 4096          # routing ids remembered (peers reconnect with new ones)
SWEEP_EVERY_BEATS = 30          # look for idle conversation caches every 30 heartbeats
MAX_PEERS = 256                 # live peers one node keeps (a Hello past that is refused)
SWEEP_MEMBERS_EVERY_BEATS = 5   # look for member sessions whose leader went quiet
HELLO_ANSWER_S = HEARTBEAT_INTERVAL_S / 2   # answer one peer's Hellos at most this often


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
    step_deadline_s: float | None = None
    key: Any = None                 # security.MeshKey; None = an open mesh


class Node:
    def __init__(self, options: NodeOptions, engine: Any) -> None:
        self.opts = options
        self.engine = engine
        self.node_id = node_id_for(options.name)
        self.transport = Transport(host=options.host, port=options.port, handler=self._dispatch,
                                   key=options.key)
        self.membership: Membership | None = None
        self.discovery: Any = None
        self._targets: dict[str, str] = {}            # address -> "static" | "mdns" | "learned"
        self._learning = DialPolicy()                 # how many learned addresses we dial
        self._addr_of: dict[str, str] = {}            # node_id -> address we dial it on
        self.roles = SessionRoles(self)
        self._by_identity: dict[bytes, str] = {}      # ROUTER routing id -> peer node id
        self._answered: dict[str, float] = {}         # peer -> when its Hello was answered
        self.incarnation = secrets.token_hex(8)        # this process; a restart is new
        self.refusals: Counter[str] = Counter()        # messages refused by authority
        self._tasks: set[asyncio.Task] = set()
        self._stopped = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def me(self) -> Member:
        return self.membership.me

    async def start(self) -> None:
        self.transport.limits = P.Limits(self.engine.vocab_size,
                                         getattr(self.engine, "context_length", None))
        port = await self.transport.start()
        host = self.opts.host if self.opts.host not in ("", "0.0.0.0") else ""
        me = Member(self.node_id, self.opts.name, self.engine.model_name, self.engine.fingerprint,
                    self.engine.vocab_size, f"{host}:{port}", self.opts.weight,
                    incarnation=self.incarnation,
                    engine=getattr(self.engine, "engine_name", ""))
        self.membership = Membership(me=me)
        for addr in self.opts.peers:
            self._targets[addr] = "static"
        if self.opts.mdns:
            await self._start_discovery(port)
        self.spawn(self._heartbeat_loop())
        log.info("node %s (%s) serving %s on port %d%s", self.opts.name, self.node_id,
                 self.engine.model_name, port, "" if self.opts.mdns else " (mDNS off)")
        if self.opts.key is None:
            log.warning("this mesh is OPEN: anyone who can reach port %d can join it and read "
                        "its text. Make a key with `dwarfmesh key` and give it to every node "
                        "(--mesh-key FILE)", port)
        else:
            log.info("mesh key %s: traffic is authenticated and encrypted (CURVE)",
                     self.opts.key.key_id)

    async def _start_discovery(self, port: int) -> None:
        from dwarfmesh.mesh.discovery import Discovery, PeerRecord

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
        self.engine.shutdown(wait=False)     # not joined: cli_node.exit_now comes next

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    def session_timeouts(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step_deadline_s": self.opts.step_deadline_s}
        if self.opts.step_timeout_s:
            out["step_timeout_s"] = self.opts.step_timeout_s
        return out

    def spawn(self, coro) -> asyncio.Task:
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
        # A receiver takes at most MAX_GOSSIP addresses: in a larger mesh, a different
        # sample each beat still reaches every peer.
        gossip = [m.address for m in self.membership.reachable() if m is not me]
        gossip = sorted(random.sample(gossip, min(len(gossip), MAX_GOSSIP)))
        return P.Hello(me.node_id, me.name, me.model, me.fingerprint, me.vocab_size,
                       PROTOCOL_VERSION, me.address, me.weight,
                       self.leading_tags()[:MAX_LEADING], gossip, self.incarnation, me.engine)

    def leading_tags(self) -> list[str]:
        """The sessions this node leads, as public tags: a session id is its client's
        capability (it may attach with it), so it is never shown to other nodes."""
        return sorted(P.session_tag(s) for s in [*self.roles.leading, *self.roles.text.leading])

    def fresh(self, node_id: str) -> bool:
        """Heard from `node_id` within the lease: a takeover of a session it leads is
        refused (deadlines.LEASE_S)."""
        if node_id == self.node_id:
            return True
        peer = self.membership.peers.get(node_id)
        return peer is not None and time.monotonic() - peer.last_seen < LEASE_S

    def refused(self, why: str) -> None:
        """A message the router or the session tables would not act on (see `sessions.router`)."""
        self.refusals[why] += 1
        self.transport._drop(f"refused: {why}", "session")

    def _dial(self, address: str) -> None:
        try:
            self.transport.connect(address)
        except zmq.ZMQError as exc:      # out of file descriptors, an address libzmq rejects
            self.transport.drop(f"cannot dial: {exc.strerror}", address)
            if self._targets.get(address) == "learned":
                del self._targets[address]
            return
        self.transport.send(address, self._hello())

    def _learn(self, address: str) -> bool:
        """Dial `address`, learned from a Hello, if the dial policy has room for it."""
        live = {m.address for m in self.membership.peers.values()} | set(self._addr_of.values())
        ok, evicted = self._learning.admit(address, self._targets, live, time.monotonic())
        for old in evicted:
            del self._targets[old]
            self.transport.disconnect(old)
        if not ok:
            self.transport.drop("refused: too many learned addresses", address)
            return False
        self._targets[address] = "learned"
        self._dial(address)
        return True

    async def _heartbeat_loop(self) -> None:
        beats = 0
        while True:
            try:
                await self._beat(beats)
            except Exception:  # noqa: BLE001 - the heartbeat must outlive any one bad beat
                log.exception("heartbeat failed; going on")
            beats += 1
            due = time.monotonic() + HEARTBEAT_INTERVAL_S
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            stalled = own_stall(due, time.monotonic())
            if stalled:
                # Stopped or starved: the peers were not silent, this node was deaf.
                log.warning("this node did not run for %.1fs; its peers' silence in that "
                            "time is not held against them", stalled)
                self.membership.excuse(stalled)

    async def _beat(self, beats: int) -> None:
        for address in list(self._targets):
            try:
                self._dial(address)
            except Exception as exc:  # noqa: BLE001 - one bad address must not stop the rest
                log.warning("cannot dial %s: %s; forgetting it", address, exc)
                self._targets.pop(address, None)
        for dead in self.membership.expire(time.monotonic()):
            log.warning("peer %s (%s) left: silent past the liveness window", dead.name,
                        dead.node_id)
            self._peer_gone(dead.node_id, "")
        if beats % SWEEP_MEMBERS_EVERY_BEATS == 0:
            await self.roles.sweep()
        if beats % SWEEP_EVERY_BEATS == 0:
            for conv in await self.engine.sweep():
                log.info("freed idle conversation %s", conv)

    def _peer_gone(self, node_id: str, why: str) -> None:
        member = self.membership.peer_down(node_id)
        self._answered.pop(node_id, None)
        address = self._addr_of.pop(node_id, None)
        if member is not None and why:
            log.warning("peer %s (%s) left: %s", member.name, node_id, why)
        if address is not None and self._targets.get(address) == "learned":
            del self._targets[address]
            self.transport.disconnect(address)
        self.roles.peer_gone(node_id)

    def _on_mdns_up(self, record: Any) -> None:
        address = record.address()
        if record.node_id != self.node_id and address not in self._targets:
            log.info("mDNS: found %s (%s) at %s", record.name, record.model, address)
            self._targets[address] = "mdns"
            self._dial(address)

    def _on_mdns_down(self, node_id: str) -> None:
        """An mDNS goodbye or expiry: a hint, not a death (multicast is lossy and anyone
        can send one). Say Hello now; the heartbeats decide whether the peer is gone."""
        address = self._addr_of.get(node_id)
        if address is not None and self._targets.get(address) == "mdns":
            self._targets[address] = "learned"
        if address is not None and node_id in self.membership.peers:
            log.info("mDNS: %s said goodbye; checking with a Hello", node_id)
            self.transport.send(address, self._hello())

    def on_hello(self, hello: P.Hello, received: Received) -> None:
        origin = received.origin
        refusal, why = P.check_version(hello), "refused: version"
        if refusal is None and (hello.node_id not in self.membership.peers
                                and len(self.membership.peers) >= MAX_PEERS):
            refusal, why = f"this node already has {MAX_PEERS} peers", "refused: too many peers"
        if refusal is not None:
            self.transport.drop(why, f"{hello.name}: {refusal}")
            if origin.identity is not None:
                self.transport.reply(origin.identity, P.Refuse(self.node_id, refusal))
            return
        if hello.node_id == self.node_id:
            return
        known = self.membership.peers.get(hello.node_id)
        if known is not None and hello.incarnation != known.incarnation:
            # The same node id from a new process: the old one died (and its sessions
            # with it) even if it came back before the liveness window ran out.
            self._peer_gone(hello.node_id, "restarted (a new incarnation)")
        if origin.identity is not None:
            self._by_identity[origin.identity] = hello.node_id
            if len(self._by_identity) > MAX_IDENTITIES:
                self._by_identity.pop(next(iter(self._by_identity)))
        host, _, port = hello.address.rpartition(":")
        address = hello.address if host else f"{origin.peer_ip}:{port}"
        member = Member(hello.node_id, hello.name, hello.model, hello.fingerprint,
                        hello.vocab_size, address, hello.weight, tuple(hello.leading),
                        incarnation=hello.incarnation, engine=hello.engine)
        now = time.monotonic()
        new = self.membership.peer_up(member, now)
        if origin.identity is not None and (
                new or now - self._answered.get(hello.node_id, -HELLO_ANSWER_S)
                >= HELLO_ANSWER_S):
            # The answer proves to the sender that this node listens where it dialled.
            self._answered[hello.node_id] = now
            self.transport.reply(origin.identity, self._hello())
        if new:
            log.info("peer %s joined: %s at %s", hello.name, hello.model, address)
            # A peer that (re)joined gets a fresh DEALER: the old one may sit in libzmq's
            # reconnect backoff, and the first Start/Open to it must not wait for that.
            old = self._addr_of.pop(hello.node_id, None)
            for stale in {old, address} - {None}:
                if self.transport.connected(stale):
                    self.transport.disconnect(stale)
        # Gossip: a peer's peers are dialed too, so `--peer` on one node builds a full mesh.
        for addr in hello.peers:
            if addr.rpartition(":")[0] and addr not in self._targets and addr != self.me.address:
                self._learn(addr)
        old = self._addr_of.get(hello.node_id)
        if old is None or not self.transport.connected(old):
            self._addr_of[hello.node_id] = address
            if address in self._targets:
                if not self.transport.connected(address):
                    self._dial(address)
            else:
                self._learn(address)
        if (origin.via == "dealer" and origin.address == self._addr_of.get(hello.node_id)
                and self.membership.verify(hello.node_id)):
            log.info("peer %s answers at %s", hello.name, origin.address)

    def reply_client(self, identity: bytes, msg: Any) -> int:
        return self.transport.reply(identity, msg)

    def send_to(self, node_id: str, msg: Any) -> int:
        """Send to a node by id; a message to this node itself is dispatched locally (on
        the next turn of the loop, like one that came over the wire)."""
        if node_id == self.node_id:
            asyncio.get_running_loop().call_soon(self._dispatch, msg, _LOCAL)
            return 0
        address = self._addr_of.get(node_id)
        return self.transport.send(address, msg) if address else 0

    # --- dispatch -------------------------------------------------------------------------

    def _dispatch(self, msg: Any, origin: Origin) -> None:
        """Every message in: who sent it, then the router's table (`sessions.router`)."""
        if origin is _LOCAL:
            sender: str | None = self.node_id
        else:
            sender = self._by_identity.get(origin.identity) if origin.identity else None
        if sender is not None and sender != self.node_id:
            # Any message proves the peer alive: a busy member streaming frames must not be
            # dropped because its heartbeat was late on a loaded machine.
            self.membership.heard_from(sender, time.monotonic())
        router.dispatch(self, msg, Received(sender, origin.identity, origin.size, origin))

    def is_node(self, sender: str | None) -> bool:
        """A peer that said Hello, or this node itself."""
        return sender is not None and (sender == self.node_id or sender in self.membership.peers)

    def on_refuse(self, msg: P.Refuse) -> None:
        self.transport.drop("refused by a peer", f"{msg.node_id}: {msg.reason}")

    def on_peers_request(self, msg: P.PeersRequest, identity: bytes) -> None:
        self.transport.reply(identity, P.PeersReply(msg.request, self.peer_list()))

    # --- introspection --------------------------------------------------------------------

    def peer_list(self) -> list[dict[str, Any]]:
        out = []
        for m in self.membership.reachable():
            me = m.node_id == self.node_id
            entry = {
                "node_id": m.node_id, "name": m.name, "model": m.model, "engine": m.engine,
                "address": m.address,   # ":port" = the address the client reached
                "fingerprint": m.fingerprint, "vocab_size": m.vocab_size, "weight": m.weight,
                "leader_of": self.leading_tags() if me else list(m.leading),
                "self": me,
            }
            if me:
                entry["stats"] = {**self.transport.stats(), "refused": dict(self.refusals),
                                  "sessions_led": len(self.roles.leading),
                                  "sessions_member": len(self.roles.member_of)}
            out.append(entry)
        return out
