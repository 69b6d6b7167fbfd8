"""The client side of the mesh: what `peers`, `generate` and `chat` use to talk to a node.

A client connects one DEALER to any node's ROUTER and never binds, so it works from any
machine that can reach one node. It finds the nodes by mDNS when given no address, and
keeps every address it learns (mDNS, the command line, the peers its node lists): while
one node with the model lives, an answer completes. A node that does not answer — before
the first token as after — is left for the next one: the client re-attaches to the
session there, or asks again (a `Generate` is idempotent by session id). Every wait has
a deadline; errors come back as `MeshError` with a one-line message.

Owns: the client side of the node protocol. Does not: take part in a session.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from dwarfmesh.config import CLIENT_TIMEOUT_S, MAX_MESSAGE_BYTES, MESH_SETTLE_S
from dwarfmesh.wire import protocol as P
from dwarfmesh.wire.security import MeshKey, apply_client

REPLY_TIMEOUT_S = 10.0
POLL_TICK_S = 0.2
PROBE_AFTER_S = 2.0        # silent this long: check the node is alive; twice: attach elsewhere
FIRST_ANSWER_S = 5.0       # a node that does not list its peers this soon: try the next


class MeshError(RuntimeError):
    """A request the mesh could not answer; str() is one line for the user."""


def parse_address(text: str) -> str:
    """Validate HOST:PORT; return it normalised, or raise ValueError with a clear message."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return f"{host.strip('[]')}:{int(port)}"


async def find_nodes(timeout: float = MESH_SETTLE_S,
                     interfaces: list[str] | None = None) -> list[str]:
    """Addresses of every node found by mDNS (by name), or MeshError."""
    from dwarfmesh.mesh.discovery import browse_once

    records = await browse_once(timeout, interfaces=interfaces)
    if not records:
        raise MeshError("no dwarfmesh node found by mDNS; start one with "
                        "`dwarfmesh node --model smollm2-135m`, or pass --connect HOST:PORT")
    return list(dict.fromkeys(r.address() for r in sorted(records, key=lambda r: r.name)))


async def find_node(timeout: float = MESH_SETTLE_S,
                    interfaces: list[str] | None = None) -> str:
    """Address of some node found by mDNS, or MeshError."""
    return (await find_nodes(timeout, interfaces))[0]


@dataclass
class GenerateResult:
    text: str
    summary: dict[str, Any] = field(default_factory=dict)


class MeshClient:
    """One DEALER to one node at a time. `address`: one node, or every node known (the
    first is tried first). `key`: the mesh key (security.resolve_key), None = open mesh."""

    def __init__(self, address: str | list[str], key: MeshKey | None = None) -> None:
        self.known = [address] if isinstance(address, str) else list(dict.fromkeys(address))
        if not self.known:
            raise MeshError("no node address to connect to")
        self.key = key
        self._ctx = zmq.asyncio.Context.instance()
        self._connect(self.known[0])

    def _connect(self, address: str) -> None:
        self.address = address
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        apply_client(self._sock, self.key)
        self._sock.connect(f"tcp://{address}")

    def _switch(self, address: str) -> None:
        self._sock.close(linger=0)
        self._connect(address)

    def _learn(self, nodes: list[dict[str, Any]]) -> None:
        for node in nodes:
            address = node.get("address", "")
            if address and not address.startswith(":") and address not in self.known:
                self.known.append(address)

    def close(self) -> None:
        self._sock.close(linger=0)

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def _recv(self, timeout: float) -> Any:
        try:
            parts = await asyncio.wait_for(self._sock.recv_multipart(), timeout)
        except asyncio.TimeoutError:
            raise MeshError(f"no answer from {self.address} within {timeout:.0f}s "
                            "(is a node running there?)") from None
        return P.decode(parts)

    async def peers(self, timeout: float = REPLY_TIMEOUT_S) -> list[dict[str, Any]]:
        """Every node the contacted node knows (itself included), with `leader_of`."""
        req = uuid.uuid4().hex[:12]
        await self._sock.send_multipart(P.encode(P.PeersRequest(req)))
        while True:
            msg = await self._recv(timeout)
            if isinstance(msg, P.PeersReply) and msg.request == req:
                host = self.address.rpartition(":")[0]
                for node in msg.nodes:
                    if node.get("address", "").startswith(":"):
                        node["address"] = host + node["address"]
                return msg.nodes

    async def generate(self, prompt: str, params: P.GenParams,
                       on_text: Callable[[str], None] | None = None,
                       cancel: asyncio.Event | None = None, *,
                       messages: list[dict[str, str]] | None = None,
                       conversation: str = "", request_id: str = "") -> GenerateResult:
        """Run one answer; call on_text for each piece; return the text and the summary.

        With `messages` (chat turns: role, content) each member applies its own chat
        template. With a `conversation` id, members keep their KV caches between calls, so
        the next turn (the same messages plus the reply and a new user turn) prefills only
        the new tokens. Set `cancel` to stop the answer early (it ends with reason
        "cancelled" and the text so far). If the node this client talks to dies mid-answer,
        the client attaches to another node of the mesh and the stream goes on from the
        next token: no token is lost or repeated. `request_id` names the answer's session
        (default: a random one); a Generate sent again with the same id gets the one
        answer, not a second.
        """
        await self._first_answering_node()
        session = conversation or request_id or uuid.uuid4().hex[:16]
        request = P.Generate(session, prompt, params, list(messages or []), conversation)
        await self._sock.send_multipart(P.encode(request))
        pieces: list[str] = []
        cancelled = False
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLIENT_TIMEOUT_S
        heard = probe_sent = loop.time()
        while True:
            if cancel is not None and cancel.is_set() and not cancelled:
                cancelled = True
                await self._sock.send_multipart(P.encode(P.Cancel(session)))
            now = loop.time()
            if now > deadline:
                raise MeshError(f"the answer took longer than {CLIENT_TIMEOUT_S:.0f}s")
            msg = None
            if now - heard > PROBE_AFTER_S and now - probe_sent > PROBE_AFTER_S:
                if probe_sent > heard:           # the last probe got no answer: node is gone
                    msg = await self._go_elsewhere(request, len(pieces))
                    heard = probe_sent = loop.time()     # (no probe out to that node yet)
                else:
                    await self._sock.send_multipart(P.encode(P.PeersRequest("probe")))
                    probe_sent = loop.time()
            if msg is None:
                # Short polls, so a cancel request is noticed promptly.
                if not await self._sock.poll(int(POLL_TICK_S * 1000)):
                    continue
                heard = loop.time()
                msg = P.decode(await self._sock.recv_multipart())
            if isinstance(msg, P.PeersReply):
                self._learn(msg.nodes)
            if isinstance(msg, P.Error) and msg.request == "":
                raise MeshError(msg.message)         # the node could not read our request
            if getattr(msg, "session", getattr(msg, "request", None)) != session:
                continue
            if isinstance(msg, P.Token):
                if msg.step != len(pieces):
                    continue                     # replayed after a re-attach: shown already
                pieces.append(msg.text)
                if on_text is not None and msg.text:
                    on_text(msg.text)
            elif isinstance(msg, P.End):
                if msg.reason.startswith("error"):
                    raise MeshError(f"the session failed: {msg.reason}")
                summary = dict(msg.summary)
                return GenerateResult(summary.get("text", "".join(pieces)), summary)
            elif isinstance(msg, P.Error):
                raise MeshError(msg.message)

    async def _first_answering_node(self) -> None:
        """Connect to the first known node that answers, and learn its peers."""
        tried: list[str] = []
        for address in list(self.known):
            if address != self.address:
                self._switch(address)
            try:
                self._learn(await self.peers(timeout=FIRST_ANSWER_S))
                return
            except MeshError:
                tried.append(address)
        raise MeshError(f"no answer from {', '.join(tried)} within {FIRST_ANSWER_S:.0f}s "
                        "(is a node running there?)")

    async def _go_elsewhere(self, request: P.Generate, next_step: int) -> Any:
        """The node stopped answering: re-attach to the session on the next node that
        answers (it streams from `next_step`), or, where no node knows the session yet
        (the request died with its node before anything was streamed), ask that node
        again. Returns the first message
        that node sent, for the caller to handle."""
        session = request.conversation or request.request
        dead = self.address
        for address in [a for a in self.known if a != dead] + [dead]:
            self._switch(address)
            await self._sock.send_multipart(P.encode(P.Attach(session, "", next_step)))
            if not await self._sock.poll(int(PROBE_AFTER_S * 1000)):
                continue
            msg = P.decode(await self._sock.recv_multipart())
            if isinstance(msg, P.Error) and msg.request == session and \
                    msg.message == "unknown session":
                if next_step:
                    continue      # a fresh answer would not continue what was shown
                await self._sock.send_multipart(P.encode(request))
                return None
            return msg
        raise MeshError(f"the node {dead} stopped answering and no other node could take "
                        "the stream over")
