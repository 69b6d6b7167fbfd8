"""One table: every message a node acts on, who may send it, and what handles it.

A message's sender is never a field of the message: it is how the message arrived.

- `ANYONE`: the handshake itself (`Hello`; a peer's `Refuse` is only counted).
- `CLIENT`: any connection to the node's ROUTER, answered on its routing identity:
  `Generate`, `PeersRequest`, `Cancel`, and `Attach` with no origin (a client whose node
  died re-attaching). A node may send these too, as a client of another node.
- `NODE`: a peer that said Hello on this connection (or this node itself, dispatching
  to itself). Anything else of this kind from a connection that has not said Hello is
  refused and counted: the session tables only ever see a sender that is a known node.

Within a session, the tables then check the session's own authority from its state, as
`authority` says for each route (tests/test_hostile_authority.py sends each from the
wrong node). Messages no node acts on (a reply meant for a client, such as `PeersReply`
or `Error`) have no route: they are refused and counted.

A handler that may wait (prefill, a step, a lock) is a coroutine and runs in a task the
node keeps; every other one runs at once, in arrival order (a frame is recorded and its
round's future set in the receive callback, never queued behind tasks).

Owns: the table and the three sender checks. Does not: hold any session state.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from dwarfmesh.wire import protocol as P


class Via(Enum):
    ANYONE = "anyone"
    CLIENT = "client"
    NODE = "node"


@dataclass(frozen=True)
class Received:
    """How a message arrived: `sender` is the node it came from (None: not a known node),
    `identity` the ROUTER routing identity to answer a client on (None: it came on a
    DEALER, or from this node itself), `size` its bytes on the wire."""

    sender: str | None
    identity: bytes | None
    size: int
    origin: Any          # transport.Origin


class RoutedNode(Protocol):
    """What the handlers in the table reach on the node."""

    roles: Any

    def on_hello(self, msg: P.Hello, received: Received) -> None: ...
    def on_refuse(self, msg: P.Refuse) -> None: ...
    def on_peers_request(self, msg: P.PeersRequest, identity: bytes) -> None: ...
    def is_node(self, sender: str | None) -> bool: ...
    def refused(self, why: str) -> None: ...
    def spawn(self, coro: Any) -> Any: ...


Handler = Callable[[Any, Any, Received], Any]


@dataclass(frozen=True)
class Route:
    via: Via
    handle: Handler        # (node, msg, received) -> None, or a coroutine to run in a task
    authority: str = ""    # within the session: who may send it, where that is checked


def _frame(n: Any, m: Any, r: Received) -> None:
    n.roles.frame(m, r.size, r.sender)


def _text_reply(n: Any, m: Any, r: Received) -> None:
    n.roles.text.reply(m, r.size, r.sender)


ROUTES: dict[type, Route] = {
    P.Hello: Route(Via.ANYONE, lambda n, m, r: n.on_hello(m, r),
                   authority="anyone; only a Hello answered on the DEALER this node dialled "
                             "makes a peer verified (Membership.reachable)"),
    P.Refuse: Route(Via.ANYONE, lambda n, m, r: n.on_refuse(m),
                    authority="anyone: counted and logged, never acted on"),
    # --- from clients ------------------------------------------------------------------
    P.Generate: Route(Via.CLIENT, lambda n, m, r: n.roles.generate(m, r.identity),
                      authority="any client; a copy of a running request is the same answer"),
    P.PeersRequest: Route(Via.CLIENT, lambda n, m, r: n.on_peers_request(m, r.identity)),
    P.Cancel: Route(
        Via.CLIENT, lambda n, m, r: n.roles.cancel(m.request, r.sender,
                                                   None if r.sender else r.identity),
        authority="the session's client (at its origin) or its origin (at the leader): "
                  "roles.cancel"),
    # --- from nodes: the leader's loop -------------------------------------------------
    P.Frame: Route(Via.NODE, _frame,
                   authority="a member of the session, about itself: roles.frame, "
                             "LeaderSession.on_frame"),
    P.DraftFrame: Route(Via.NODE, _frame, authority="as Frame"),
    P.Leave: Route(Via.NODE, lambda n, m, r: n.roles.leave(m, r.sender),
                   authority="a member of the session, about itself: roles.leave"),
    P.Deposed: Route(Via.NODE, lambda n, m, r: n.roles.deposed(m, r.sender),
                     authority="the session's roster or origin, naming a roster node whose "
                               "claim outranks: LeaderSession.on_deposed"),
    P.Proposal: Route(Via.NODE, _text_reply,
                      authority="a member of the text session, about itself: "
                                "TextTable.reply, TextLeaderSession.on_reply"),
    P.Scores: Route(Via.NODE, _text_reply, authority="as Proposal"),
    P.TextFrame: Route(Via.NODE, _text_reply, authority="as Proposal"),
    P.Attach: Route(Via.NODE, lambda n, m, r: n.roles.leader_attach(m, r.sender),
                    authority="a node of the session, naming itself as the new origin: "
                              "roles.leader_attach"),
    # --- from nodes: a member's side -----------------------------------------------------
    P.Start: Route(Via.NODE, lambda n, m, r: n.roles.lead(m, r.sender),
                   authority="the session's origin, naming itself: roles.lead"),
    P.Open: Route(Via.NODE, lambda n, m, r: n.roles.open(m, r.sender),
                  authority="the leader it names, within its share of this node: roles.open"),
    P.Token: Route(Via.NODE, lambda n, m, r: n.roles.on_tokens(m, r.sender),
                   authority="the leader of the best (term, rank) claim: MemberSession.follow"
                             ", ClientStream.follow"),
    P.Tokens: Route(Via.NODE, lambda n, m, r: n.roles.on_tokens(m, r.sender),
                    authority="as Token"),
    P.End: Route(Via.NODE, lambda n, m, r: n.roles.on_end(m, r.sender),
                 authority="as Token"),
    P.Resume: Route(Via.NODE, lambda n, m, r: n.roles.on_resume(m, r.sender),
                    authority="as Token (a takeover's claim; also a leader's acknowledgement "
                              "of a Start, to the origin)"),
    P.TextOpen: Route(Via.NODE, lambda n, m, r: n.roles.text.open(m, r.sender),
                      authority="the leader it names: TextTable.handle"),
    P.Candidates: Route(Via.NODE, lambda n, m, r: n.roles.text.on_candidates(m, r.sender),
                        authority="the text session's leader: TextMemberSession.follow"),
    P.Commit: Route(Via.NODE, lambda n, m, r: n.roles.text.on_commit(m, r.sender),
                    authority="the text session's leader; to a new leader, a member ahead "
                              "of it (adoption): TextTable.handle"),
}

# A client re-attaching (Attach with no origin) is a client request; a node naming itself
# the new origin is a node message (the table's entry).
CLIENT_ATTACH = Route(Via.CLIENT, lambda n, m, r: n.roles.attach(m, r.identity),
                      authority="any client that knows the session id; it becomes the "
                                "session's client here: roles.attach")


def route_for(msg: Any) -> Route | None:
    if isinstance(msg, P.Attach) and not msg.origin:
        return CLIENT_ATTACH
    return ROUTES.get(type(msg))


def dispatch(node: RoutedNode, msg: Any, received: Received) -> None:
    """Check the sender against the route, then handle (inline, or in a task)."""
    route = route_for(msg)
    if route is None:
        node.refused(f"{type(msg).__name__} is not for a node")
        return
    if route.via is Via.CLIENT and received.identity is None:
        node.refused(f"{type(msg).__name__} is a client's request")
        return
    if route.via is Via.NODE and not node.is_node(received.sender):
        node.refused("a node message before its Hello")
        return
    result = route.handle(node, msg, received)
    if inspect.iscoroutine(result):
        node.spawn(result)
