"""The router's table: every message a node may receive has one route, and the sender
checks hold before any handler runs.

The handlers are recorded by a stand-in node (the router's whole contract with a node is
`RoutedNode`: a handful of methods), so each rule is checked alone; the real node's
dispatch is exercised by every mesh test and by the hostile suites.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from samples import SAMPLES

from dwarfmesh.sessions import router
from dwarfmesh.sessions.router import ROUTES, Received, Via, route_for
from dwarfmesh.wire import protocol as P
from dwarfmesh.wire.messages import MESSAGES

FOR_CLIENTS = {P.PeersReply, P.Error}     # a node sends these; none acts on one


class Recorder:
    """Stands in for the node: records which handler ran, with which sender."""

    def __init__(self, peers: set[str]) -> None:
        self.peers, self.calls, self.refusals, self.tasks = peers, [], [], []
        calls = self.calls

        class Table:
            def __getattr__(self, name):
                def handler(*args):
                    calls.append(name)
                    if name in ("lead", "open", "on_end", "on_resume", "on_candidates",
                                "on_commit"):
                        async def later():
                            return None
                        return later()
                    return None
                return handler

        self.roles = Table()
        self.roles.text = Table()

    def on_hello(self, msg, received):
        self.calls.append("on_hello")

    def on_refuse(self, msg):
        self.calls.append("on_refuse")

    def on_peers_request(self, msg, identity):
        self.calls.append("on_peers_request")

    def is_node(self, sender):
        return sender in self.peers

    def refused(self, why):
        self.refusals.append(why)

    def spawn(self, coro):
        self.tasks.append(coro)
        coro.close()


OTHERS = [      # the messages samples.py leaves out
    P.Deposed("s1", "n2", 1),
    P.TextOpen("s1", "n1", "n2", ["n1", "n2"], P.GenParams(mode="stream"), False, "rank", "hi",
               [], 12),
    P.Proposal("s1", 0, "n2", 5, " there", False, 0, 0.5, 3.0),
    P.Candidates("s1", 0, [" there"], [False]),
    P.Scores("s1", 0, "n2", 5, [0.5], 3.0),
    P.TextFrame("s1", 0, "n2", 5, 0.1, -9.0, None, 0.5, 3.0, [" a"],
                np.array([-0.1], dtype=np.float16)),
    P.Commit("s1", 0, " there", 7, False, 12),
]


def _sample(cls):
    return next(m for m in SAMPLES + OTHERS if type(m) is cls)


@pytest.mark.timeout(10)
def test_every_message_a_node_acts_on_has_exactly_one_route():
    routed = set(ROUTES)
    assert routed | FOR_CLIENTS == set(MESSAGES)
    assert not routed & FOR_CLIENTS
    assert all(r.authority for cls, r in ROUTES.items() if cls is not P.PeersRequest)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("cls", [c for c in MESSAGES if c not in FOR_CLIENTS],
                         ids=lambda c: c.__name__)
def test_the_sender_check_runs_before_any_handler(cls):
    msg = _sample(cls)
    route = route_for(msg)
    known, stranger_conn, local = ("peer", b"id"), (None, b"id"), ("me", None)
    for (sender, identity) in (known, stranger_conn, local):
        node = Recorder(peers={"peer", "me"})
        router.dispatch(node, msg, Received(sender, identity, 100, None))
        allowed = (route.via is Via.ANYONE
                   or route.via is Via.CLIENT and identity is not None
                   or route.via is Via.NODE and sender is not None)
        assert bool(node.calls) == allowed, (cls.__name__, sender, identity, node.calls)
        assert bool(node.refusals) == (not allowed)


@pytest.mark.timeout(10)
def test_attach_from_a_client_and_from_a_node_take_different_routes():
    node = Recorder(peers={"peer"})
    router.dispatch(node, P.Attach("s", "", 3), Received(None, b"client", 10, None))
    router.dispatch(node, P.Attach("s", "peer", 3), Received("peer", b"id", 10, None))
    router.dispatch(node, P.Attach("s", "peer", 3), Received(None, b"stranger", 10, None))
    assert node.calls == ["attach", "leader_attach"]
    assert node.refusals == ["a node message before its Hello"]


@pytest.mark.timeout(10)
def test_replies_meant_for_clients_are_refused_and_counted():
    node = Recorder(peers={"peer"})
    for cls in FOR_CLIENTS:
        router.dispatch(node, _sample(cls), Received("peer", b"id", 10, None))
    assert node.calls == [] and len(node.refusals) == len(FOR_CLIENTS)


@pytest.mark.timeout(10)
def test_handlers_that_wait_run_in_a_task_and_the_rest_at_once():
    node = Recorder(peers={"peer"})
    router.dispatch(node, _sample(P.End), Received("peer", b"id", 10, None))
    router.dispatch(node, _sample(P.Frame), Received("peer", b"id", 10, None))
    assert node.calls == ["on_end", "frame"]
    assert len(node.tasks) == 1 and asyncio.iscoroutine(node.tasks[0])
