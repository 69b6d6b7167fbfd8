"""The client side of the mesh: what `peers`, `generate` and `chat` use to talk to a node.

A client connects one DEALER to any node's ROUTER and never binds, so it works from any
machine that can reach one node. It finds a node by mDNS when given no address. Every
wait has a deadline; errors come back as `MeshError` with a one-line message.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.asyncio

from dwarfmesh import protocol as P
from dwarfmesh.config import CLIENT_TIMEOUT_S, MAX_MESSAGE_BYTES, MESH_SETTLE_S
from dwarfmesh.security import MeshKey, apply_client

REPLY_TIMEOUT_S = 10.0
POLL_TICK_S = 0.2
PROBE_AFTER_S = 3.0        # silent this long: check the node is alive; twice: attach elsewhere


class MeshError(RuntimeError):
    """A request the mesh could not answer; str() is one line for the user."""


def parse_address(text: str) -> str:
    """Validate HOST:PORT; return it normalised, or raise ValueError with a clear message."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return f"{host.strip('[]')}:{int(port)}"


async def find_node(timeout: float = MESH_SETTLE_S,
                    interfaces: list[str] | None = None) -> str:
    """Address of some node found by mDNS, or MeshError."""
    from dwarfmesh.discovery import browse_once

    records = await browse_once(timeout, interfaces=interfaces)
    if not records:
        raise MeshError("no dwarfmesh node found by mDNS; start one with "
                        "`dwarfmesh node --model smollm2-135m`, or pass --connect HOST:PORT")
    return sorted(records, key=lambda r: r.name)[0].address()


@dataclass
class GenerateResult:
    text: str
    summary: dict[str, Any] = field(default_factory=dict)


class MeshClient:
    """One DEALER to one node. `key`: the mesh key (security.resolve_key), None = open mesh."""

    def __init__(self, address: str, key: MeshKey | None = None) -> None:
        self.address = address
        self.key = key
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        apply_client(self._sock, key)
        self._sock.connect(f"tcp://{address}")

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
                       conversation: str = "") -> GenerateResult:
        """Run one answer; call on_text for each piece; return the text and the summary.

        With `messages` (chat turns: role, content) each member applies its own chat
        template. With a `conversation` id, members keep their KV caches between calls, so
        the next turn (the same messages plus the reply and a new user turn) prefills only
        the new tokens. Set `cancel` to stop the answer early (it ends with reason
        "cancelled" and the text so far). If the node this client talks to dies mid-answer,
        the client attaches to another node of the mesh and the stream goes on from the
        next token: no token is lost or repeated.
        """
        alternates = [n["address"] for n in await self.peers() if not n.get("self")]
        session = conversation or uuid.uuid4().hex[:16]
        await self._sock.send_multipart(P.encode(
            P.Generate(session, prompt, params, list(messages or []), conversation)))
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
            if now - heard > PROBE_AFTER_S and now - probe_sent > PROBE_AFTER_S:
                if probe_sent > heard:           # the last probe got no answer: node is gone
                    await self._attach_elsewhere(alternates, session, len(pieces))
                    heard = loop.time()
                else:
                    await self._sock.send_multipart(P.encode(P.PeersRequest("probe")))
                probe_sent = loop.time()
            # Short polls, so a cancel request is noticed promptly.
            if not await self._sock.poll(int(POLL_TICK_S * 1000)):
                continue
            heard = loop.time()
            msg = P.decode(await self._sock.recv_multipart())
            if isinstance(msg, P.Error) and msg.request == "":
                raise MeshError(msg.message)         # the node could not read our request
            if getattr(msg, "session", getattr(msg, "request", None)) != session:
                continue
            if isinstance(msg, P.Token):
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

    async def _attach_elsewhere(self, alternates: list[str], session: str, next_step: int) -> None:
        for address in alternates:
            if address == self.address:
                continue
            self.close()
            self.__init__(address, self.key)
            await self._sock.send_multipart(P.encode(P.Attach(session, "", next_step)))
            if await self._sock.poll(int(PROBE_AFTER_S * 1000)):
                return
        raise MeshError(f"the node {self.address} stopped answering and no other node "
                        "could take the stream over")
