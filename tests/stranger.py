"""What an attacker on the LAN has, for the hostile-peer tests: a plain ZeroMQ DEALER that
sends well-formed protocol messages (it never needs to be a node), raw TCP and HTTP, and
a look at a node process from outside (/proc: RSS, open file descriptors)."""

from __future__ import annotations

import asyncio
import os
import resource
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from dwarfmesh.ui.client import MeshClient
from dwarfmesh.wire import protocol as P


class Stranger:
    """A DEALER connected to one node's ROUTER. Blocking calls, every wait bounded."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)          # never drop what the test sends
        self.sock.connect(f"tcp://{address}")

    def send(self, msg) -> None:
        self.sock.send_multipart(P.encode(msg))

    def recv(self, timeout_s: float = 2.0):
        """The next decodable message, or None when nothing came in time."""
        end = time.monotonic() + timeout_s
        while (left := end - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000)):
                return None
            try:
                return P.decode(self.sock.recv_multipart())
            except P.ProtocolError:
                continue
        return None

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until the node has read what was sent: ask, and wait for the answer."""
        self.send(P.PeersRequest("flush"))
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            msg = self.recv(end - time.monotonic())
            if isinstance(msg, P.PeersReply) and msg.request == "flush":
                return
        raise AssertionError("the node did not answer a PeersRequest in time")

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


class Listener:
    """A ROUTER on 127.0.0.1 that answers every Hello with `make_hello()`, as a node does
    (so the nodes count whoever says Hellos with its address as reachable), and keeps the
    other messages it gets (`got`). Its socket is used by its own thread only."""

    def __init__(self, make_hello: Callable[[], Any]) -> None:
        self.make_hello, self.got = make_hello, []
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.address = f"127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            if not self.sock.poll(100):
                continue
            frames = self.sock.recv_multipart()
            try:
                msg = P.decode(frames[1:])
            except P.ProtocolError:
                continue
            if isinstance(msg, P.Hello):
                self.sock.send_multipart([frames[0], *P.encode(self.make_hello())])
            else:
                self.got.append(msg)

    def close(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)
        self.sock.close(linger=0)
        self.ctx.term()


def hello(node_id: str = "stranger1", *, fingerprint: str = "ffff", vocab: int = 320,
          address: str = "127.0.0.1:1", name: str = "stranger", peers=(), version=None):
    return P.Hello(node_id, name, "m-stranger", fingerprint, vocab,
                   P.PROTOCOL_VERSION if version is None else version, address, 1.0, [],
                   list(peers))


def me(address: str, timeout: float = 5.0) -> dict:
    """The node's own entry of its peers reply (with its stats)."""
    async def ask():
        async with MeshClient(address) as c:
            return await c.peers(timeout=timeout)
    return next(n for n in asyncio.run(ask()) if n["self"])


def dropped(address: str) -> dict[str, int]:
    return me(address)["stats"]["dropped"]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def idle_connections(port: int, n: int) -> list[socket.socket]:
    """n TCP connections to 127.0.0.1:port that send nothing."""
    # The test process imported mlx-lm, which lowered its descriptor limit.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(True)
        s.settimeout(5)
        s.connect(("127.0.0.1", port))
        socks.append(s)
    return socks


def closed_by_server(socks: list[socket.socket]) -> int:
    """How many of these connections the server has closed (EOF or reset)."""
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            while s.recv(65536):             # what the server sent first (a ZMTP greeting)
                pass
            closed += 1
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed
