"""Hostile peers: the attacks a stranger on the LAN was seen to make, replayed (by a
plain ZeroMQ DEALER sending well-formed messages, or raw TCP) against real node
processes, with the outcome asserted: the node lives, its heartbeats go on, what it
refused is counted, and the mesh's answer is exactly what it is without the stranger.

The rows that need the node to accept session messages only from the node the session
says may send them are in `test_hostile_authority.py`.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import zmq
from hostile_mesh import CONTEXT, VOCAB, assert_unharmed, two_nodes
from meshutil import free_port, peers_of, start_node, stop
from stranger import (
    Stranger,
    closed_by_server,
    dropped,
    hello,
    idle_connections,
    me,
    open_fds,
    rss_mb,
)

from dwarfmesh.wire import admission
from dwarfmesh.wire import protocol as P
from dwarfmesh.wire.transport import DROP_LOG_INTERVAL_S

pytestmark = pytest.mark.usefixtures("own_model_cache")   # tiny GGUFs' tokenizers


@pytest.fixture(scope="module")
def hostile_mesh(tiny_ggufs_shared, tmp_path_factory):
    with two_nodes(tiny_ggufs_shared, tmp_path_factory.mktemp("hostile")) as mesh:
        yield mesh


def count(stats: dict, prefix: str) -> int:
    return sum(v for k, v in stats.items() if k.startswith(prefix))


@pytest.mark.timeout(180)
def test_ids_outside_the_vocabulary_or_context_are_dropped(hostile_mesh):
    addr = hostile_mesh["addrs"][0]
    before = count(dropped(addr), "malformed")
    s = Stranger(addr)
    try:
        attacks = [
            P.Open("x", "g", "g", ["g"], P.GenParams(mode="stream"), False,
                   np.array([1, 2_000_000_000], np.uint32)),          # was a SIGSEGV
            P.Open("y", "g", "g", ["g"], P.GenParams(mode="stream"), False,
                   np.array([1, VOCAB], np.uint32)),                  # just past the vocab
            P.Open("z", "g", "g", ["g"], P.GenParams(mode="stream"), False,
                   np.ones(CONTEXT + 1, np.uint32)),                  # past the context
            P.Token("x", 0, VOCAB, 0, "", False),
            P.Frame("x", 0, "g", 0, 0.5, None, -1, None, 1.0, np.array([VOCAB], np.uint32),
                    np.array([-1.0], np.float16)),
        ]
        for msg in attacks:
            s.send(msg)
        s.flush()
    finally:
        s.close()
    assert count(dropped(addr), "malformed") - before == len(attacks)
    assert_unharmed(hostile_mesh)


@pytest.mark.timeout(180)
def test_bad_gossip_neither_kills_heartbeats_nor_exhausts_descriptors(hostile_mesh):
    addr, pid = hostile_mesh["addrs"][0], hostile_mesh["procs"][0].pid
    fds_before = open_fds(pid)
    before = count(dropped(addr), "malformed")
    s = Stranger(addr)
    try:
        s.send(hello("gossip0", peers=["127.0.0.1:x"]))               # killed the heartbeat
        s.send(hello("gossip1", peers=[f"10.255.{i // 256}.{i % 256}:9" for i in range(4096)]))
        s.flush()
        assert count(dropped(addr), "malformed") - before == 2
        # Well-formed gossip from many strangers: 40 x 64 dead addresses, 2,560 in all
        for k in range(40):
            s.send(hello(f"gossip{k + 2}", address=f"127.0.0.2:{1000 + k}",
                         peers=[f"127.0.0.3:{2000 + 64 * k + i}" for i in range(64)]))
        s.flush()
        assert open_fds(pid) - fds_before < 400, (fds_before, open_fds(pid))
        assert count(dropped(addr), "refused: too many learned") > 0
    finally:
        s.close()
    time.sleep(5)                      # past the liveness window: strangers must expire
    names = [n["name"] for n in peers_of(addr, timeout=5)]
    assert "stranger" not in names, names                  # the heartbeat still expires peers
    assert open_fds(pid) - fds_before < 400
    assert_unharmed(hostile_mesh)


@pytest.mark.timeout(180)
def test_impossible_log_probabilities_are_dropped(hostile_mesh):
    addr = hostile_mesh["addrs"][0]
    fingerprint = me(addr)["fingerprint"]
    before = count(dropped(addr), "malformed")
    s = Stranger(addr)
    ids, lps = np.array([1, 2], np.uint32), np.array([-0.1, -3.0], np.float16)
    try:
        s.send(hello("copycat", fingerprint=fingerprint))
        s.send(P.Frame("s", 0, "copycat", 0, 0.1, None, -1, -3e38, 1.0, ids, lps))
        s.send(P.Frame("s", 1, "copycat", 0, 0.1, 3e38, 1, None, 1.0, ids, lps))
        s.send(P.Frame("s", 1, "copycat", 0, 0.1, 0.5, 1, None, 1.0, ids, lps))
        s.send(P.TextFrame("s", 0, "copycat", 0, 0.1, -1.0, None, -1.0, 1.0, ["a", "b"], lps))
        s.send(P.Proposal("s", 0, "copycat", 0, " x", False, 0, -5.0, 1.0))
        s.flush()
    finally:
        s.close()
    assert count(dropped(addr), "malformed") - before == 5
    time.sleep(4)                    # the copycat expires (it would be asked to prefill)
    assert_unharmed(hostile_mesh)


@pytest.mark.timeout(180)
def test_candidates_too_big_to_score_are_dropped(hostile_mesh):
    addr, pid = hostile_mesh["addrs"][0], hostile_mesh["procs"][0].pid
    rss0 = rss_mb(pid)
    before = count(dropped(addr), "malformed")
    s = Stranger(addr)
    try:
        s.send(P.TextOpen("t1", "g", "g", ["g"], P.GenParams(mode="stream"), False, "rank",
                          "hello", [], 12))
        s.send(P.Candidates("t1", 0, [" the" * 600] * 48, [False] * 48))   # was 0.9 -> 3.2 GB
        s.send(P.Candidates("t1", 0, [" the"] * 33, [False] * 33))
        s.flush()
    finally:
        s.close()
    assert count(dropped(addr), "malformed") - before == 2
    assert rss_mb(pid) - rss0 < 50
    assert_unharmed(hostile_mesh)


@pytest.mark.timeout(180)
def test_huge_names_are_refused_and_refusals_are_logged_rate_limited(hostile_mesh):
    addr, cache = hostile_mesh["addrs"][0], hostile_mesh["cache"]
    log = cache / "node0.log"
    lines_before = len(log.read_text().splitlines())
    before = dropped(addr)
    s = Stranger(addr)
    t0 = time.monotonic()
    try:
        for i in range(8):
            s.send(hello(f"big{i}", name="n" * 1_000_000))
            s.send(hello(f"far{i}", address="h" * 1_000_000 + ":1"))
        for i in range(5000):
            s.send(hello(f"old{i}", version=99))
        s.flush(timeout_s=30)
    finally:
        s.close()
    spent = time.monotonic() - t0
    after = dropped(addr)
    assert count(after, "malformed") - count(before, "malformed") == 16
    assert after.get("refused: version", 0) - before.get("refused: version", 0) == 5000
    reply = peers_of(addr, timeout=5)
    assert len(json.dumps(reply)) < 64 << 10
    added = len(log.read_text().splitlines()) - lines_before
    # one WARNING per reason per interval (two reasons here), not one per Hello
    assert added <= 2 * (spent / DROP_LOG_INTERVAL_S + 2) + 4, added
    assert_unharmed(hostile_mesh)


@pytest.mark.timeout(180)
def test_idle_tcp_connections_are_closed_and_the_node_answers(hostile_mesh):
    port, pid = hostile_mesh["ports"][0], hostile_mesh["procs"][0].pid
    fds_before = open_fds(pid)
    socks = idle_connections(port, 2100)
    try:
        t0 = time.monotonic()
        peers_of(hostile_mesh["addrs"][0], timeout=5)            # answers while they sit
        assert time.monotonic() - t0 < 5
        time.sleep(8)                    # past the handshake timeout (5 s)
        closed = closed_by_server(socks)
        assert closed >= 0.95 * len(socks), closed
    finally:
        for s in socks:
            s.close()
    time.sleep(1)
    assert open_fds(pid) - fds_before < 100
    assert_unharmed(hostile_mesh)


@pytest.mark.timeout(120)
def test_one_address_holds_a_bounded_number_of_zmq_connections(hostile_mesh):
    port = hostile_mesh["ports"][0]
    ctx = zmq.Context()
    socks = []

    def answered(n: int) -> int:
        """Open n DEALERs from 127.0.0.2 (not this host's own address), ask each for the
        peers; how many got an answer."""
        new = []
        for _ in range(n):
            d = ctx.socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.connect(f"tcp://127.0.0.2:0;127.0.0.1:{port}")
            new.append(d)
            time.sleep(0.01)          # one at a time, as a flood from one host arrives
        socks.extend(new)
        for d in new:
            try:      # a DEALER whose connection the node already closed has no peer to
                d.send_multipart(P.encode(P.PeersRequest("cap")), flags=zmq.NOBLOCK)
            except zmq.Again:   # queue for: a blocking send would wait forever
                pass
        time.sleep(5)
        return sum(1 for d in new if d.poll(0))

    try:
        got = answered(100)
        assert admission.MAX_PER_ADDRESS - 4 <= got <= admission.MAX_PER_ADDRESS + 4, got
        for d in socks:
            d.close(linger=0)
        socks.clear()
        time.sleep(1)
        assert answered(4) == 4            # the address is admitted again once under the cap
    finally:
        for d in socks:
            d.close(linger=0)
        ctx.term()
    assert count(dropped(hostile_mesh["addrs"][0]), "refused: too many connections") > 0
    assert_unharmed(hostile_mesh)


@pytest.mark.timeout(120)
def test_a_second_node_with_a_live_nodes_identity_refuses_to_start(hostile_mesh, tiny_ggufs_shared):
    cache, logs = hostile_mesh["cache"], hostile_mesh["cache"] / "second"
    logs.mkdir(exist_ok=True)
    proc = start_node(tiny_ggufs_shared[1], "node0", free_port(), cache, log_dir=logs)
    try:
        assert proc.wait(timeout=60) == 2
    finally:
        stop([proc])
    text = (logs / "node0.log").read_text()
    assert "already running" in text and "Traceback" not in text
    errors = [line for line in text.splitlines() if "error" in line]
    assert len(errors) == 1, text
    assert hostile_mesh["procs"][0].poll() is None
