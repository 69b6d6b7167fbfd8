"""ZeroMQ transport: one ROUTER a node binds, one DEALER per peer it talks to.

The rule that keeps this simple: a node-to-node message always travels on the sender's
DEALER to the receiver's ROUTER. The ROUTER's only replies go to the socket a message came
in on: answering a Hello (or refusing it) and answering clients (`peers`, `generate`,
`chat`), which connect a DEALER and never bind.

Everything that arrives is decoded and validated by `protocol.decode` on the way in; a
malformed message is dropped, counted by reason, logged (rate-limited) and never reaches
the node. Sends never block the event loop: they are non-blocking; a message to a peer
whose connection is (re)establishing is queued by libzmq and delivered on connect, and
past the high-water mark (a peer long gone) it is dropped and counted. Byte counters are
kept at this layer, where "bytes on the wire" is honest.

The transport knows nothing about sessions, election or models.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from dwarfmesh.config import (
    HANDSHAKE_TIMEOUT_S,
    HEARTBEAT_INTERVAL_S,
    LIVENESS,
    MAX_MESSAGE_BYTES,
    RECONNECT_IVL_MAX_MS,
    RECONNECT_IVL_MS,
)
from dwarfmesh.wire import admission, protocol, security

log = logging.getLogger(__name__)

SNDHWM = 10_000                 # messages queued per connected peer before sends drop
DROP_LOG_INTERVAL_S = 5.0       # at most one log line per drop reason per interval


@dataclass(frozen=True)
class Origin:
    """Where an incoming message came from."""

    via: str                    # "router" (a peer's DEALER or a client) or "dealer" (a reply)
    identity: bytes | None      # ROUTER routing id, to answer on the same connection
    peer_ip: str                # source IP as libzmq saw it ("" if unknown)
    address: str | None         # for "dealer": the peer address this DEALER is connected to
    size: int                   # bytes of the whole message


Handler = Callable[[Any, Origin], Awaitable[None] | None]


def _is_client_request(body: list[Any]) -> bool:
    """Whether a rejected message carried a client request tag (so it deserves an answer)."""
    tag = body[1].bytes if len(body) > 1 else b""
    return len(tag) == 1 and tag[0] in (protocol.Generate.TAG, protocol.PeersRequest.TAG,
                                        protocol.Attach.TAG)


def _apply_common(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    # A connection that has not finished the ZMTP handshake this long is closed (libzmq's
    # default is 30 s): idle TCP connections from a stranger do not pile up.
    sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_TIMEOUT_S * 1000))
    # A peer that vanished without a FIN (cable pulled, laptop asleep) is noticed by TCP.
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 60)
    sock.setsockopt(zmq.SNDHWM, SNDHWM)
    sock.setsockopt(zmq.RCVHWM, SNDHWM)


class Transport:
    def __init__(self, *, host: str, port: int, handler: Handler,
                 key: security.MeshKey | None = None,
                 ctx: zmq.asyncio.Context | None = None) -> None:
        self.host = host
        self.port = port
        self.key = key
        self._auth: Any = None
        self._handler = handler
        self._ctx = ctx or zmq.asyncio.Context.instance()
        self._router: zmq.asyncio.Socket | None = None
        self._dealers: dict[str, zmq.asyncio.Socket] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_received = 0
        self.dropped: Counter[str] = Counter()      # inbound messages rejected, by reason
        self.send_failures = 0
        self._last_drop_log: dict[str, float] = {}
        self.limits = protocol.Limits()             # the node sets its model's, once loaded
        self.cap: admission.ConnectionCap | None = None

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> int:
        """Bind the ROUTER (port 0 picks a free one); return the bound port."""
        router = self._ctx.socket(zmq.ROUTER)
        _apply_common(router)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # ZAP consults the handler on every handshake, open mesh or not: the mesh key (if
        # any) and the per-address connection cap (admission.py) both live there.
        await self._start_auth()
        router.zap_domain = b"dwarfmesh"
        security.apply_server(router, self.key)
        monitor = router.get_monitor_socket(
            admission.EVENTS | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        self._tasks["monitor"] = asyncio.create_task(self._monitor_loop(monitor))
        bind_host = "*" if self.host in ("", "0.0.0.0") else self.host
        if self.port:
            router.bind(f"tcp://{bind_host}:{self.port}")
        else:
            self.port = router.bind_to_random_port(f"tcp://{bind_host}")
        self._router = router
        self._tasks["router"] = asyncio.create_task(self._recv_loop(router, None), name="router")
        return self.port

    async def _start_auth(self) -> None:
        """ZAP handler: admit only peers that hold the mesh's key pair (with a key) and
        addresses under the connection cap; count the others."""
        from zmq.auth.asyncio import AsyncioAuthenticator

        transport = self
        self._auth = AsyncioAuthenticator(self._ctx)
        self._auth.start()
        self.cap = admission.ConnectionCap(self._auth)
        if self.key is None:
            return

        class MeshKeyOnly:
            def callback(self, domain: str, client_key: bytes) -> bool:
                ok = client_key == transport.key.public
                if not ok:
                    transport._drop("refused: wrong mesh key", "zap")
                return ok

        self._auth.configure_curve_callback("dwarfmesh", credentials_provider=MeshKeyOnly())

    async def _monitor_loop(self, monitor: zmq.asyncio.Socket) -> None:
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                where = str(event.get("endpoint", b""), "utf-8", "replace")
                if event["event"] & admission.EVENTS:
                    self.cap.event(event)
                elif event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    if self.key is None:            # with a key, ZAP counted those itself
                        self._drop("refused: too many connections from one address", where)
                else:
                    self._drop("refused: handshake failed (no or another mesh key?)", where)
        finally:
            monitor.close(linger=0)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
        for sock in self._dealers.values():
            sock.close(linger=0)
        self._dealers.clear()
        if self._router is not None:
            self._router.close(linger=0)
            self._router = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    # --- peers --------------------------------------------------------------------------

    def connect(self, address: str) -> None:
        """Open (once) a DEALER to a peer's ROUTER at host:port."""
        if address in self._dealers:
            return
        sock = self._ctx.socket(zmq.DEALER)
        try:
            _apply_common(sock)
            sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_IVL_MS)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_IVL_MAX_MS)
            # ZMTP heartbeats: a connection that brings nothing back for the liveness
            # window is closed and dialled again. After a short link outage TCP resends
            # what it had queued with exponential backoff (a 3 s outage can hold the next
            # segment back 3 s more); a fresh connection does not wait for that, and what
            # was lost with the old one is asked for again (deadlines.py).
            sock.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_INTERVAL_S * 1000))
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(HEARTBEAT_INTERVAL_S * LIVENESS * 1000))
            security.apply_client(sock, self.key)
            sock.connect(f"tcp://{address}")
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        self._dealers[address] = sock
        self._tasks[f"dealer:{address}"] = asyncio.create_task(
            self._recv_loop(sock, address), name=f"dealer:{address}")

    def disconnect(self, address: str) -> None:
        sock = self._dealers.pop(address, None)
        task = self._tasks.pop(f"dealer:{address}", None)
        if task is not None:
            task.cancel()
        if sock is not None:
            sock.close(linger=0)

    def connected(self, address: str) -> bool:
        return address in self._dealers

    def send(self, address: str, msg: Any) -> int:
        """Send on the DEALER to `address`; return bytes sent (0 if dropped)."""
        sock = self._dealers.get(address)
        if sock is None:
            self.send_failures += 1
            return 0
        return self._send(sock, protocol.encode(msg), address)

    def reply(self, identity: bytes, msg: Any) -> int:
        """Answer on the ROUTER, to the connection that `identity` names."""
        if self._router is None:
            return 0
        return self._send(self._router, [identity, *protocol.encode(msg)], "router")

    def _send(self, sock: zmq.asyncio.Socket, parts: list[bytes], where: str) -> int:
        # Through the asyncio socket, not a synchronous shadow: a send can consume the
        # socket's edge-triggered "readable" event, and zmq.asyncio re-checks for waiting
        # receivers after its own sends only (a shadow send stalled the receive loop).
        # With NOBLOCK the returned future is already resolved.
        fut = sock.send_multipart(parts, flags=zmq.NOBLOCK, copy=True)
        if fut.exception() is not None:
            # zmq.Again: the peer's queue is full (it has been gone a while);
            # EHOSTUNREACH: a client that went away. Either way the message is not sent.
            self.send_failures += 1
            return 0
        size = sum(len(p) for p in parts)
        self.bytes_sent += size
        return size

    # --- receiving ----------------------------------------------------------------------

    async def _recv_loop(self, sock: zmq.asyncio.Socket, address: str | None) -> None:
        is_router = address is None
        while True:
            try:
                frames = await sock.recv_multipart(copy=False)
            except asyncio.CancelledError:
                raise
            except zmq.ZMQError as exc:
                if exc.errno in (zmq.ENOTSOCK, zmq.ETERM):
                    return
                self._drop(f"recv: {exc.strerror}", address or "router")
                continue
            size = sum(len(f) for f in frames)
            self.bytes_received += size
            identity = frames[0].bytes if is_router else None
            body = frames[1:] if is_router else frames
            if not body:
                self._drop("empty message", address or "router")
                continue
            try:
                peer_ip = body[0].get("Peer-Address") or ""
            except (zmq.ZMQError, AttributeError):
                peer_ip = ""
            try:
                msg = protocol.decode([f.buffer for f in body], self.limits)
            except protocol.ProtocolError as exc:
                self._drop(f"malformed: {str(exc)[:60]}", peer_ip or address or "?")
                if is_router and _is_client_request(body):
                    # A client (perhaps of another version) would otherwise wait for nothing.
                    self.reply(identity, protocol.Error("", f"request rejected: {exc}"))
                continue
            self.messages_received += 1
            origin = Origin("router" if is_router else "dealer", identity, peer_ip, address, size)
            try:
                result = self._handler(msg, origin)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # noqa: BLE001 - a handler bug must not kill the receive loop
                log.exception("handler failed on %s from %s", type(msg).__name__, peer_ip)
                self.dropped["handler error"] += 1

    def drop(self, reason: str, where: str) -> None:
        """Count a message the node refused (and log it, at most once per reason per
        interval, with the running count): a flood of them costs a counter, not a log."""
        self._drop(reason, where)

    def _drop(self, reason: str, where: str) -> None:
        key = reason.split(":")[0] if reason.startswith("malformed") else reason
        self.dropped[key] += 1
        now = time.monotonic()
        if now - self._last_drop_log.get(key, 0.0) > DROP_LOG_INTERVAL_S:
            self._last_drop_log[key] = now
            log.warning("dropped a message (%s) [%s]; %d dropped so far",
                        reason, where, sum(self.dropped.values()))

    def stats(self) -> dict[str, Any]:
        return {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "messages_received": self.messages_received,
            "dropped": dict(self.dropped),
            "send_failures": self.send_failures,
        }
