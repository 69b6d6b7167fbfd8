"""Hostile peers, the attacks that need *authority* to stop: session messages accepted
only from the node the session's state says may send them, a Hello before anything
counts, and slots reclaimed from sessions that never progress.

Every test here is marked `# needs authority (lead's branch)`: each depends on that work
and fails where it is not in. They run on their own mesh (a stranger's 16 Opens would
hold its slots, were they accepted).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
from hostile_mesh import answer, assert_unharmed, two_nodes, whole_mesh_answer
from meshutil import peers_of
from stranger import Listener, Stranger, hello, me

from dwarfmesh.mesh.membership import rendezvous_score
from dwarfmesh.sessions.deadlines import MIN_PREFILL_WAIT_S, START_ACK_S
from dwarfmesh.wire import protocol as P

pytestmark = pytest.mark.usefixtures("own_model_cache")   # tiny GGUFs' tokenizers


@pytest.fixture(scope="module")
def authority_mesh(tiny_ggufs_shared, tmp_path_factory):
    with two_nodes(tiny_ggufs_shared, tmp_path_factory.mktemp("authority")) as mesh:
        yield mesh


@pytest.mark.timeout(120)
def test_injected_session_messages_do_not_touch_a_live_answer(authority_mesh):
    # needs authority (lead's branch)
    addr = authority_mesh["addrs"][0]
    ref = whole_mesh_answer(addr, max_tokens=200)
    out: dict = {}
    # The session id is chosen here, so the strangers inject from before the answer
    # starts until it ends: no poll has to catch a short answer live.
    sid = f"inject-live-{time.monotonic_ns()}"
    runner = threading.Thread(
        target=lambda: out.update(answer(addr, max_tokens=200, request_id=sid)))
    strangers = [Stranger(a) for a in authority_mesh["addrs"]]
    rounds = 0
    try:
        runner.start()
        while runner.is_alive():
            for s in strangers:
                for session in (sid, P.session_tag(sid)):   # its id, and its public tag
                    for step in range(0, 200, 7):
                        s.send(P.Token(session, step, 5, 0, "INJECTED", False))
                    s.send(P.Attach(session, "stranger1", 0))
                    s.send(P.Resume(session, "stranger1", 0))
                    s.send(P.End(session, "eos", {"text": "INJECTED ANSWER BY A STRANGER"}))
                    s.send(P.Cancel(session))
                # (an Attach from a client with the id itself is its client's right: the
                # id is the client's capability; the tag is public)
                s.send(P.Attach(P.session_tag(sid), "", 0))
            rounds += 1
            time.sleep(0.005)            # a steady stream, not a flood (test_hostile's)
    finally:
        runner.join(timeout=180)
        for s in strangers:
            s.close()
    assert rounds > 0 and out.get("text") == ref["text"]


@contextmanager
def silent_peer(addr: str, node_id: str, leads: bool):
    """A peer that says Hello with the mesh's fingerprint every 0.5 s and answers the
    nodes' Hellos (so it is a reachable member, alive by heartbeats) and never answers
    anything else; yields a conversation id whose rendezvous leader is that peer (`leads`)
    or a real node; returns once it has left."""
    fingerprint = me(addr)["fingerprint"]
    ids = [n["node_id"] for n in peers_of(addr, timeout=5)] + [node_id]
    conversation = next(c for c in (f"conv{i}" for i in range(1000))
                        if (max(ids, key=lambda n: (rendezvous_score(c, n), n)) == node_id)
                        == leads)
    s = Stranger(addr)
    stop_beating = threading.Event()
    inbox = Listener(lambda: hello(node_id, fingerprint=fingerprint, address=inbox.address))

    def beat():
        while not stop_beating.is_set():
            s.send(hello(node_id, fingerprint=fingerprint, address=inbox.address))
            stop_beating.wait(0.5)

    beater = threading.Thread(target=beat)
    beater.start()
    try:
        deadline = time.monotonic() + 10
        while node_id not in {n["node_id"] for n in peers_of(addr, timeout=5)}:
            assert time.monotonic() < deadline, "the silent peer never joined"
            time.sleep(0.1)
        yield conversation
    finally:
        stop_beating.set()
        beater.join()
        s.close()
        inbox.close()
    time.sleep(4)                        # past the liveness window: it has left


@pytest.mark.timeout(120)
def test_a_hello_then_silence_does_not_stall_an_answer(authority_mesh):
    # needs authority (lead's branch)
    # A member that never answers its Open, under a real node's lead (a silent *leader*:
    # test_a_silent_peer_elected_leader_is_passed_over).
    addr = authority_mesh["addrs"][0]
    ref = whole_mesh_answer(addr, max_tokens=10)
    with silent_peer(addr, "silent", leads=False) as conversation:
        t0 = time.monotonic()
        out = answer(addr, max_tokens=10, conversation=conversation)
        assert time.monotonic() - t0 < 30
        assert out["text"] == ref["text"]


@pytest.mark.timeout(120)
def test_a_silent_peer_elected_leader_is_passed_over(authority_mesh):
    # needs authority (lead's branch). The peer is a member, so it may be elected; the
    # conversation id is chosen so that it is, which leaves the answer to the origin
    # passing over a leader that never acknowledges its Start.
    addr = authority_mesh["addrs"][0]
    ref = whole_mesh_answer(addr, max_tokens=10)
    with silent_peer(addr, "silent2", leads=True) as conversation:
        t0 = time.monotonic()
        out = answer(addr, max_tokens=10, conversation=conversation)
        # passed over after START_ACK_S; the next leader waits for the silent member's
        # first frame (MIN_PREFILL_WAIT_S: the tiny model's own prefill is far shorter)
        assert time.monotonic() - t0 < START_ACK_S + MIN_PREFILL_WAIT_S + 15
        assert out["text"] == ref["text"]
        assert out["leader"] != "stranger"


@pytest.mark.timeout(120)
def test_a_copycat_that_answers_with_impossible_frames_does_not_steer_or_stall(authority_mesh):
    # needs authority (lead's branch): its frames are dropped (test_hostile), so it is a
    # member that never answers, which only the lead's work leaves out in time
    import zmq

    addr = authority_mesh["addrs"][0]
    fingerprint = me(addr)["fingerprint"]
    ref = whole_mesh_answer(addr, max_tokens=10)
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.ROUTER)           # where the nodes send it Opens and Tokens
    inbox.setsockopt(zmq.LINGER, 0)
    port = inbox.bind_to_random_port("tcp://127.0.0.1")
    s = Stranger(addr)
    done = threading.Event()

    def lie():
        ids, lps = np.array([5], np.uint32), np.array([0.0], np.float16)
        last = 0.0
        while not done.is_set():
            if time.monotonic() - last > 0.5:
                s.send(hello("copycat", fingerprint=fingerprint, address=f"127.0.0.1:{port}"))
                last = time.monotonic()
            if not inbox.poll(100):
                continue
            frames = inbox.recv_multipart()
            try:
                msg = P.decode(frames[1:])
            except P.ProtocolError:
                continue
            if isinstance(msg, P.Hello):     # answered as a node does: it is reachable
                inbox.send_multipart([frames[0], *P.encode(
                    hello("copycat", fingerprint=fingerprint, address=f"127.0.0.1:{port}"))])
            if isinstance(msg, (P.Open, P.Token)):
                step = 0 if isinstance(msg, P.Open) else msg.step + 1
                s.send(P.Frame(msg.session, step, "copycat", 0, 0.0,
                               None if step == 0 else 3e38, -1, -3e38 if step == 0 else None,
                               1.0, ids, lps))

    liar = threading.Thread(target=lie)
    liar.start()
    try:
        time.sleep(1)
        t0 = time.monotonic()
        out = answer(addr, max_tokens=10)
        assert time.monotonic() - t0 < 30
        assert out["text"] == ref["text"]
    finally:
        done.set()
        liar.join()
        s.close()
        inbox.close()
        ctx.term()
    time.sleep(4)


@pytest.mark.timeout(120)
def test_stranger_opens_do_not_hold_session_slots(authority_mesh):
    # needs authority (lead's branch)
    s = Stranger(authority_mesh["addrs"][0])
    try:
        for i in range(16):
            s.send(P.Open(f"hog{i}", "g", "g", ["g"], P.GenParams(mode="stream"), False,
                          np.array([1, 2, 3], np.uint32)))
        s.flush()
    finally:
        s.close()
    time.sleep(2)
    assert_unharmed(authority_mesh)


@pytest.mark.timeout(120)
def test_a_stranger_that_only_says_hello_is_in_no_session(authority_mesh):
    # Hellos to both nodes with another model's tokenizer and an address nobody listens
    # on, every 0.3 s from before the answer to its end: a peer counted as live would
    # turn the session into a text session over three members (or lead it). It stays
    # unlisted, ungossiped, and out of the answer.
    addrs = authority_mesh["addrs"]
    ref = whole_mesh_answer(addrs[0], max_tokens=40)
    strangers = [Stranger(a) for a in addrs]
    done = threading.Event()
    replies: list = []

    def beat():
        while not done.is_set():
            for s in strangers:
                s.send(hello("hello-only", fingerprint="0123abcd", address="127.0.0.1:9"))
            for s in strangers:
                while (msg := s.recv(0.15)) is not None:
                    replies.append(msg)

    beater = threading.Thread(target=beat)
    beater.start()
    try:
        time.sleep(1.5)
        for a in addrs:
            assert "hello-only" not in {n["node_id"] for n in peers_of(a, timeout=5)}
        out = answer(addrs[0], max_tokens=40)
    finally:
        done.set()
        beater.join()
        for s in strangers:
            s.close()
    assert out["mode"] == "fuse-ids" and sorted(out["members"]) == ["node0", "node1"]
    assert out["text"] == ref["text"]
    hellos = [m for m in replies if isinstance(m, P.Hello)]
    assert len({h.node_id for h in hellos}) == 2, "each node answers a Hello with its own"
    assert all("127.0.0.1:9" not in h.peers for h in hellos)
    time.sleep(4)                            # past the liveness window: it has left
