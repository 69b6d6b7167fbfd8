"""What the session tables may ask of their node, and of each other: typed ports.

The session tables (`roles.SessionRoles`, `text_table.TextTable`) are given a
`NodePort` when they are made, never the node itself, so what they can do is written
here: send a message to a node by id (itself included, dispatched locally), answer a
client by its routing identity, start a task the node keeps a reference to, count a
refused message, tell whether a peer was heard from within the lease, read the
membership and the engine, and the session timeouts. `node.Node` is one; the in-memory
tests (`tests/inproc.py`) drive real nodes whose transport is a dict of queues.

The text table streams to the node's clients through the origin role of the node's
session roles (`RolesPort`: one client stream per session, whatever its mode), and asks
them whether a leader already holds its share of this node's sessions.

Owns: the two interfaces. Does nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from dwarfmesh.mesh.membership import Member, Membership

Send = Callable[[str, Any], int]     # to a node by id (itself included) -> bytes sent


class NodePort(Protocol):
    """The node, as its session tables see it."""

    node_id: str
    engine: Any
    membership: Membership

    @property
    def me(self) -> Member: ...

    def send_to(self, node_id: str, msg: Any) -> int:
        """To a node by id (bytes sent; 0 when it cannot be reached). To this node
        itself: dispatched on the next turn of the loop, as if it came over the wire."""

    def reply_client(self, identity: bytes, msg: Any) -> int:
        """To a client, by the routing identity its request came from."""

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task:
        """Run `coro` in a task the node holds (and cancels when it stops)."""

    def refused(self, why: str) -> None:
        """Count a message the tables would not act on (who sent it may not)."""

    def fresh(self, node_id: str) -> bool:
        """Heard from `node_id` within the lease (a takeover of its sessions waits)."""

    def session_timeouts(self) -> dict[str, float | None]:
        """`step_timeout_s` and `step_deadline_s` for a leader."""


class RolesPort(Protocol):
    """The node's session roles, as its text table sees them: the client streams (origin
    role), what finished answers it keeps, and the share of sessions one leader holds."""

    clients: dict[str, Any]

    def to_client(self, msg: Any, sender: str) -> None:
        """A leader's Token / End / Resume for a session this node is the origin of."""

    def stray(self, msg: Any, sender: str) -> None:
        """A leader's message for a session this node is not in: tell it so."""

    def remember_leader(self, session: str, leader: str, term: int = 0) -> None:
        """Who led a finished session (a late client re-attaching is sent there)."""

    def keep_finished(self, session: str, sent: list[Any]) -> None:
        """What a finished answer streamed, for a client that re-attaches late."""

    def past_share(self, leader: str) -> bool:
        """`leader` holds its share of this node's sessions as member already."""
