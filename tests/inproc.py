"""Real nodes in one process, wired by an in-memory network that can lose chosen messages.

Each `Node` is the real one (dispatch, authority, session tables, leaders, members,
failover) on a real engine; only the transport is replaced, because real sockets cannot
lose exactly one message on demand (what a SIGKILL leaves in ZeroMQ's queues decides
that). Messages are the real ones, encoded and decoded by the real protocol, delivered
in order through the event loop, except those `drop(src, dst, msg)` says were lost.
A client is a routing identity whose replies are collected (`Net.client`).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from typing import Any

from dwarfmesh.mesh.membership import Member, Membership
from dwarfmesh.node import Node, NodeOptions
from dwarfmesh.wire import protocol as P
from dwarfmesh.wire.transport import Origin

CLIENT = b"client"


def engines_on_one_thread(paths: list[Any], backend: str = "auto",
                          names: list[str] | None = None) -> list[Any]:
    """Loaded engines for `paths` (node{i} runs paths[i], named names[i], by default
    tiny{i}) sharing one model thread, as a node's sessions share its one engine thread;
    `stop(engines)` shuts them down."""
    from dwarfmesh.engine.choose import make_engine

    names = names or [f"tiny{i}" for i in range(len(paths))]
    out = [make_engine(str(m), backend, model_name=n, pull=False)[0]
           for m, n in zip(paths, names)]
    for e in out:
        e.load_sync()
        e._pool = out[0]._pool
    return out


def stop(engines: list[Any]) -> None:
    for e in engines:
        e.shutdown(wait=True)


class _Transport:
    """Stands in for `transport.Transport`: same send/reply, no sockets."""

    def __init__(self, net: Net, address: str) -> None:
        self.net, self.address = net, address
        self.dropped: Counter[str] = Counter()

    def send(self, address: str, msg: Any) -> int:
        return self.net.deliver(self.address, address, msg)

    def reply(self, identity: bytes, msg: Any) -> int:
        if identity == CLIENT:
            self.net.client.append(P.decode(P.encode(msg)))
        else:      # an answer comes in on the DEALER that dialled this node
            self.net.deliver(self.address, identity.decode(), msg, via="dealer")
        return 1

    def _drop(self, reason: str, where: str) -> None:
        self.dropped[reason] += 1

    drop = _drop                 # the node counts its own refusals through this too

    def stats(self) -> dict[str, Any]:
        return {"dropped": dict(self.dropped)}

    def connect(self, address: str) -> None:
        pass

    def disconnect(self, address: str) -> None:
        pass

    def connected(self, address: str) -> bool:
        return True


class Net:
    """`engines[i]` runs as node `node{i}` at address `addr(f"node{i}")`; everyone sees
    everyone. (Addresses are names here: nothing is ever sent to them.)"""

    def __init__(self, engines: list[Any], drop=None, step_timeout_s: float | None = None,
                 step_deadline_s: float | None = None):
        self.drop = drop or (lambda src, dst, msg: False)
        self.alive: set[str] = set()
        self.client: list[Any] = []
        self.nodes: dict[str, Node] = {}
        self.by_address: dict[str, Node] = {}
        for i, engine in enumerate(engines):
            node = Node(NodeOptions(model=engine.model_name, name=f"node{i}", mdns=False,
                                    step_timeout_s=step_timeout_s,
                                    step_deadline_s=step_deadline_s), engine)
            address = f"127.0.0.1:{17000 + i}"
            node.transport = _Transport(self, address)
            node.membership = Membership(me=Member(
                node.node_id, f"node{i}", engine.model_name, engine.fingerprint,
                engine.vocab_size, address, incarnation=node.incarnation))
            self.nodes[node.node_id] = node
            self.by_address[address] = node
            self.alive.add(address)
        loop_now = 0.0
        for node in self.nodes.values():
            for other in self.nodes.values():
                if other is not node:
                    node.membership.peer_up(replace(other.membership.me, verified=True),
                                            loop_now)
                    node._addr_of[other.node_id] = other.membership.me.address
                    node._by_identity[other.membership.me.address.encode()] = other.node_id
        for node in self.nodes.values():        # never expire: deaths are told (kill)
            node.membership.liveness_s = float("inf")

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes.values() if n.opts.name == name)

    def addr(self, name: str) -> str:
        return self.node(name).membership.me.address

    def deliver(self, src: str, dst: str, msg: Any, via: str = "router") -> int:
        if dst not in self.alive or src not in self.alive or self.drop(src, dst, msg):
            return 0
        wire = P.decode(P.encode(msg))
        node = self.by_address[dst]
        origin = (Origin("router", src.encode(), "127.0.0.1", None, 100) if via == "router"
                  else Origin("dealer", None, "127.0.0.1", src, 100))
        asyncio.get_running_loop().call_soon(self._dispatch, node, dst, wire, origin)
        return 100

    def _dispatch(self, node: Node, dst: str, msg: Any, origin: Origin) -> None:
        if dst in self.alive:
            node._dispatch(msg, origin)

    def generate(self, via: str, req: P.Generate) -> None:
        """A client's Generate, arriving at node `via` (a name)."""
        node = self.node(via)
        origin = Origin("router", CLIENT, "127.0.0.1", None, 100)
        node._dispatch(P.decode(P.encode(req)), origin)

    def hello(self, name: str) -> None:
        """Node `name` says Hello to everyone (as its heartbeat would)."""
        node = self.node(name)
        for other in self.nodes.values():
            if other is not node:
                self.deliver(node.membership.me.address, other.membership.me.address,
                             node._hello())

    def kill(self, name: str) -> None:
        """The node dies at once; the others notice (as the heartbeats would)."""
        dead = self.node(name)
        self.alive.discard(dead.membership.me.address)
        for task in list(dead._tasks):
            task.cancel()
        for node in self.nodes.values():
            if node is not dead and node.membership.me.address in self.alive:
                node._peer_gone(dead.node_id, "")

    async def end(self, timeout: float) -> P.End:
        """Wait for the client's End (or an Error)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            for msg in self.client:
                if isinstance(msg, (P.End, P.Error)):
                    return msg
            await asyncio.sleep(0.01)
        raise AssertionError(f"no End within {timeout}s; client got {self.client[-3:]}")

    def streamed(self) -> list[P.Token]:
        return [m for m in self.client if isinstance(m, P.Token)]
