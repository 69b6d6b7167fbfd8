"""A cap on the ZeroMQ connections one address may hold to a node's ROUTER.

libzmq has no connection limit of its own. What it has: a monitor that reports every
accepted and every closed connection (with its file descriptor), and ZAP, which every
handshake on a socket with a ZAP domain consults, with the peer's address. So the
transport's monitor feeds `ConnectionCap` the accepted/disconnected events; the cap
reads each accepted connection's peer address from its descriptor and counts per
address; while an address holds `MAX_PER_ADDRESS` or more, it is on the ZAP handler's
deny list, and its new handshakes fail (existing connections are untouched). Connections
that never handshake are closed by libzmq after `HANDSHAKE_IVL` (transport.py).

This node's own loopback address is exempt (its HTTP API opens one client connection per
request). The count is approximate by a connection or two: the accept event and the
handshake of one connection race. It knows nothing about messages.
"""

from __future__ import annotations

import socket
from collections import Counter
from typing import Any

import zmq

MAX_PER_ADDRESS = 64
EXEMPT = frozenset({"127.0.0.1", "::1"})
EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED


def peer_address(fd: int) -> str:
    """The remote IP of an accepted TCP connection's descriptor ("" if unknown)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            with socket.fromfd(fd, family, socket.SOCK_STREAM) as s:    # a duplicate
                return str(s.getpeername()[0])
        except OSError:
            continue
    return ""


class ConnectionCap:
    def __init__(self, auth: Any, most: int = MAX_PER_ADDRESS) -> None:
        self.auth, self.most = auth, most         # a zmq.auth Authenticator
        self.open: Counter[str] = Counter()
        self._address_of: dict[int, str] = {}
        self.denied = 0                           # times an address went over the cap

    def event(self, event: dict[str, Any]) -> None:
        fd = event["value"]
        if event["event"] == zmq.EVENT_ACCEPTED:
            address = peer_address(fd)
            if not address or address in EXEMPT:
                return
            self._address_of[fd] = address
            self.open[address] += 1
            if self.open[address] == self.most:
                self.denied += 1
                self.auth.deny(address)
        elif event["event"] == zmq.EVENT_DISCONNECTED:
            address = self._address_of.pop(fd, None)
            if address is None:
                return
            self.open[address] -= 1
            if self.open[address] < self.most:
                self.auth._denied.discard(address)   # pyzmq has deny() but no undo
            if self.open[address] <= 0:
                del self.open[address]
