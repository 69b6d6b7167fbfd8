"""Failover races made certain: real nodes in one process (`inproc.Net`), real engines,
real messages, and a network that loses exactly the message a race depends on.

Real sockets cannot lose one chosen message (what a SIGKILL leaves in ZeroMQ's queues
decides that), so these tests replace only the transport. Three copies of one model make
the expected answer exact whatever the membership: that model's own greedy continuation.
Every session runs on the machine's default engine (tiny GGUFs: llama.cpp on a CPU-only
machine); an id session's expected answer is that engine's own, and the text session runs
three tokenizers (conftest's `mixed_ggufs`).
"""

from __future__ import annotations

import asyncio

import pytest
from inproc import Net, engines_on_one_thread, stop
from meshutil import session_led_by
from reference import engine_greedy

import dwarfmesh  # noqa: F401  (OpenBLAS preload before mlx)
from dwarfmesh.wire import protocol as P
from dwarfmesh.wire.protocol import GenParams

PROMPT = "def quicksort(xs):"
TOKENS = 48
KILL_AFTER_S = 0.02     # a SIGKILL'd node's last messages arrive before its death is noticed


pytestmark = pytest.mark.usefixtures("own_model_cache")   # tiny GGUFs' tokenizers


@pytest.fixture(scope="module")
def model(tiny_ggufs_shared):
    return str(tiny_ggufs_shared[0])


@pytest.fixture()
def engines(model, tmp_path, monkeypatch):
    monkeypatch.setenv("DWARFMESH_STATE", str(tmp_path))
    out = engines_on_one_thread([model] * 3, names=["tiny"] * 3)
    yield out
    stop(out)


@pytest.fixture(scope="module")
def reference(model):
    return engine_greedy(model, PROMPT, TOKENS)


def _ids(net: Net) -> dict[str, str]:
    return {n.opts.name: n.node_id for n in net.nodes.values()}


def _request(session: str) -> P.Generate:
    return P.Generate(session, PROMPT, GenParams(
        mode="stream", max_tokens=TOKENS, weights="equal"), [],
                      session)


@pytest.mark.timeout(120)
def test_a_new_leader_sends_a_member_the_token_it_missed(engines, reference):
    """The leader's last Token reached the member that takes over but not the other one,
    then the leader died. The new leader is one token ahead of that member: it must send
    it the Token it lacks (not wait the step timeout for a frame that is not coming), and
    the member stays in the session."""
    kill_at = 10
    net = Net(engines)
    ids = _ids(net)
    session = session_led_by(ids["node0"], list(ids.values()), second=ids["node1"])
    leader = net.node("node0").membership.me.address
    behind = net.node("node2").membership.me.address
    sent: set[str] = set()

    def drop(src, dst, msg) -> bool:
        if src == leader and isinstance(msg, P.Token) and msg.step == kill_at:
            sent.add(dst)
            if len(sent) == 2:                       # both members: then node0 dies
                # (what it sent is on the wire: delivered before the death is noticed)
                asyncio.get_running_loop().call_later(KILL_AFTER_S, net.kill, "node0")
            return dst == behind
        return False

    net.drop = drop

    async def go() -> P.End:
        net.generate("node2", _request(session))
        return await asyncio.wait_for(net.end(60), 60)

    end = asyncio.run(go())
    s = end.summary
    assert isinstance(end, P.End) and end.reason in ("eos", "length"), end
    assert s["token_ids"] == reference                  # nothing lost, nothing repeated
    assert [t.step for t in net.streamed()] == list(range(len(reference)))
    assert s["leader"] == "node1" and s["term"] == 1
    assert sorted(s["members"]) == ["node1", "node2"]   # caught up, not dropped
    text = engines[0].tokenizer.decode([t for t in reference
                                        if t not in engines[0].eos_ids])
    # (a UTF-8 character the length limit cut in two is never streamed)
    assert "".join(t.text for t in net.streamed()) == s["text"] == text.rstrip("\ufffd")


@pytest.mark.timeout(120)
def test_a_paused_leader_is_deposed_and_the_answer_stays_exact(engines, reference):
    """The leader stops answering (a laptop lid closed, SIGSTOP) and the others take it
    for dead; a member takes over in term 1. Then the old leader wakes up and goes on as
    if nothing happened: its Tokens must be refused, it must learn it was deposed and
    stop, and the client must see one exact answer from the new leader."""
    net = Net(engines, step_timeout_s=2.0)
    ids = _ids(net)
    session = session_led_by(ids["node0"], list(ids.values()), second=ids["node1"])
    old = net.node("node0")
    paused = {"on": False}
    step = old.engine.step

    async def frozen_step(*args, **kwargs):
        # Nothing runs on a paused machine: its next frame waits for it to wake up.
        while paused["on"]:
            await asyncio.sleep(0.02)
        return await step(*args, **kwargs)

    old.engine.step = frozen_step

    def drop(src, dst, msg) -> bool:
        if isinstance(msg, P.Token) and msg.step == 8 and src == net.addr("node0") \
                and not paused["on"]:
            paused["on"] = True
            loop = asyncio.get_running_loop()
            loop.call_soon(_others_give_up)
            loop.call_later(3.0, _wake_up)
        return False

    def _wake_up() -> None:
        paused["on"] = False
        net.hello("node0")                           # its heartbeats resume

    def _others_give_up() -> None:
        for name in ("node1", "node2"):
            net.node(name)._peer_gone(old.node_id, "")

    net.drop = drop

    async def go():
        net.generate("node2", _request(session))
        await asyncio.sleep(0.5)
        led = old.roles.leading[session]
        end = await asyncio.wait_for(net.end(60), 60)
        for _ in range(200):                         # the old leader must step down
            if session not in old.roles.leading:
                break
            await asyncio.sleep(0.05)
        return end, led

    end, led = asyncio.run(go())
    s = end.summary
    assert s["token_ids"] == reference
    assert s["leader"] == "node1" and s["term"] == 1
    assert [t.step for t in net.streamed()] == list(range(len(reference)))
    assert "".join(t.text for t in net.streamed()) == s["text"]
    assert led.deposed is not None and led.deposed.term == 1
    assert session not in old.roles.leading


@pytest.mark.timeout(120)
def test_a_request_whose_leader_just_died_is_led_by_the_next(engines, reference):
    """The origin elects a leader that died a moment ago (the heartbeats have not told
    yet): its Start is lost. Once the death is known the origin re-elects, in term 1."""
    net = Net(engines)
    ids = _ids(net)
    session = session_led_by(ids["node1"], list(ids.values()))
    net.alive.discard(net.addr("node1"))             # dead, but nobody knows yet

    async def go():
        net.generate("node0", _request(session))
        await asyncio.sleep(1.5)
        for name in ("node0", "node2"):
            net.node(name)._peer_gone(ids["node1"], "")
        return await asyncio.wait_for(net.end(60), 60)

    end = asyncio.run(go())
    s = end.summary
    assert s["token_ids"] == reference
    assert s["leader"] != "node1" and s["term"] == 1


@pytest.mark.timeout(60)
def test_an_mdns_goodbye_is_a_hint_not_a_death(engines):
    """A forged or lost-multicast goodbye must not drop a peer whose heartbeats arrive."""
    net = Net(engines)
    ids = _ids(net)
    node0 = net.node("node0")

    async def go():
        node0._on_mdns_down(ids["node1"])
        await asyncio.sleep(0)
    asyncio.run(go())
    assert ids["node1"] in node0.membership.peers


@pytest.mark.timeout(60)
def test_session_messages_from_a_stranger_or_a_non_leader_are_refused(engines):
    """Authority: a Token, End or Cancel for a live session is acted on only from the
    session's leader (or, for Cancel, its client); a message from a connection that never
    said Hello counts for nothing."""
    net = Net(engines)
    ids = _ids(net)
    session = session_led_by(ids["node0"], list(ids.values()))

    async def go():
        net.generate("node2", _request(session))
        await asyncio.sleep(0.3)
        node2 = net.node("node2")
        # node1 (a member, not the leader) and an unknown connection try to end it
        node2._dispatch(P.End(session, "eos", {"text": "INJECTED"}),
                        _origin(net.addr("node1").encode()))
        node2._dispatch(P.Token(session, 1, 5, 0, "INJECTED", True), _origin(b"stranger"))
        node2._dispatch(P.Cancel(session), _origin(b"another-client"))
        return await asyncio.wait_for(net.end(60), 60)

    end = asyncio.run(go())
    assert end.reason in ("eos", "length")
    assert "INJECTED" not in end.summary["text"]
    assert all("INJECTED" not in t.text for t in net.streamed())
    refusals = net.node("node2").refusals
    assert refusals["a node message before its Hello"] >= 1
    assert refusals["Cancel from a client that does not own the session"] == 1


def _origin(identity: bytes):
    from dwarfmesh.wire.transport import Origin
    return Origin("router", identity, "127.0.0.1", None, 100)


@pytest.mark.timeout(240)
def test_a_new_text_leader_adopts_a_commit_only_some_members_got(mixed_ggufs, tmp_path,
                                                                  monkeypatch):
    """The text-session form of the first test: the dead leader's last Commit reached one
    member (the client's node, so the client has the piece) but not the member that
    takes over. The new leader must adopt the piece from the member that has it and go
    on from there."""
    monkeypatch.setenv("DWARFMESH_STATE", str(tmp_path))
    engines = engines_on_one_thread(mixed_ggufs, names=[f"m{i}" for i in range(3)])
    net = Net(engines)
    ids = _ids(net)
    session = session_led_by(ids["node0"], list(ids.values()), second=ids["node1"])
    old_piece: list[str] = []
    sent: set[str] = set()

    def drop(src, dst, msg) -> bool:
        if src == net.addr("node0") and isinstance(msg, P.Commit) and msg.step == 0:
            old_piece[:] = [msg.text]
            sent.add(dst)
            if len(sent) == 2:                       # both members: then node0 dies
                # (what it sent is on the wire: delivered before the death is noticed)
                asyncio.get_running_loop().call_later(KILL_AFTER_S, net.kill, "node0")
            return dst == net.addr("node1")
        return False

    net.drop = drop
    req = P.Generate(session, PROMPT, GenParams(max_tokens=40, mode="rank"), [], "")

    async def go():
        net.generate("node2", req)
        return await asyncio.wait_for(net.end(200), 200)

    try:
        end = asyncio.run(go())
    finally:
        for e in engines:
            e.shutdown(wait=True)
    s = end.summary
    pieces = [t.text for t in net.streamed()]
    assert s["leader"] == "node1" and sorted(s["members"]) == ["node1", "node2"]
    assert s["adopted_steps"] == 1 and s["resumed_at_step"] == 1
    assert old_piece and pieces[0] == old_piece[0]
    assert "".join(pieces) == s["text"] and s["steps"] == len(pieces) > 1


def test_a_member_earns_online_weight_only_for_what_its_frame_said():
    """A member's claimed log p of the committed token is capped by its own frame for that
    step: in its top-k, the frame's value; outside, its smallest top-k value and its rest
    mass. An honest member's exact value passes unchanged (within float16 rounding)."""
    import numpy as np

    from dwarfmesh.sessions.leader import earned_logp

    frame = P.Frame("s", 3, "m", 0, 0.25, None, -1, None, 1.0,
                    np.array([7, 9, 4], np.uint32), np.array([-0.5, -1.5, -2.0], np.float16))
    assert earned_logp(-0.5001, frame, 7) == pytest.approx(-0.5001)      # honest, in top-k
    assert earned_logp(0.0, frame, 7) == pytest.approx(-0.49, abs=1e-3)  # a lie, capped
    assert earned_logp(0.0, frame, 11) == pytest.approx(-1.99, abs=3e-3)  # outside: capped
    assert earned_logp(-3.0, frame, 11) == -3.0                          # honest, outside
    low = P.Frame("s", 3, "m", 0, 1e-6, None, -1, None, 1.0,
                  np.array([7], np.uint32), np.array([0.0], np.float16))
    assert earned_logp(-0.1, low, 11) == pytest.approx(np.log(1e-6))    # rest mass bounds it
    assert earned_logp(None, None, 5) == 0.0


@pytest.mark.timeout(120)
def test_a_completion_keeps_the_leading_space_of_its_first_token(engines, model):
    """A completion continues its prompt: the first token's leading space is text (code's
    indentation), unlike a chat reply's first word. The streamed pieces and the summary
    text must be exactly the tokenizer's decoding of the answer's tokens."""
    from tiny import TOKENIZER_TEXT

    tok = engines[0].tokenizer

    words = TOKENIZER_TEXT.split()[:40]
    grams = (" ".join(words[i:j]) for i in range(len(words))
             for j in range(i + 1, min(i + 4, len(words))))
    prompt = next(p for p in grams            # one whose answer starts with a space
                  if tok.decode(engine_greedy(model, p, 1)).startswith(" "))
    net = Net(engines)
    session = "completion-space"
    req = P.Generate(session, prompt, GenParams(
        mode="stream", max_tokens=12, weights="equal"), [], "")

    async def go():
        net.generate("node0", req)
        return await asyncio.wait_for(net.end(60), 60)

    end = asyncio.run(go())
    ids = end.summary["token_ids"]
    # (a character the length limit cut in two has no text yet: it is not sent)
    want = tok.decode([t for t in ids if t not in tok.eos_token_ids]).rstrip("\ufffd")
    assert want.startswith(" ")
    assert end.summary["text"] == want
    assert "".join(t.text for t in net.streamed()) == want


@pytest.mark.timeout(120)
def test_the_last_node_standing_finishes_the_answer(engines, reference):
    """The leader dies, then the node that took over: the last member sees only itself,
    a minority of the session, but also the session's origin (itself, the client's
    node), so it goes on rather than abstain: while one node lives, the answer completes."""
    net = Net(engines)
    ids = _ids(net)
    session = session_led_by(ids["node0"], list(ids.values()), second=ids["node1"])
    killed: list[str] = []

    def drop(src, dst, msg) -> bool:
        if isinstance(msg, P.Token) and msg.step == 10 and not killed:
            killed.append("node0")
            asyncio.get_running_loop().call_soon(net.kill, "node0")
        elif (isinstance(msg, P.Resume) and src == net.addr("node1") and killed == ["node0"]):
            # node1's takeover announces itself: it dies right there (a timer would race
            # the tiny models, which finish the answer within milliseconds)
            killed.append("node1")
            asyncio.get_running_loop().call_soon(net.kill, "node1")
            return True
        return False

    net.drop = drop

    async def go():
        net.generate("node2", _request(session))
        return await asyncio.wait_for(net.end(60), 60)

    end = asyncio.run(go())
    s = end.summary
    assert isinstance(end, P.End), end
    assert s["token_ids"] == reference
    assert s["leader"] == "node2" and s["members"] == ["node2"]
    assert "".join(t.text for t in net.streamed()) == s["text"]


@pytest.mark.timeout(120)
def test_a_client_that_reattaches_to_a_lone_survivor_gets_its_answer(engines, reference):
    """The leader and the client's node die together; the client re-attaches to the last
    member (which may be taking over already, or holding back: it saw a minority and not
    the origin). It is the live side: it leads, and replays what the client missed."""
    net = Net(engines)
    ids = _ids(net)
    session = session_led_by(ids["node0"], list(ids.values()), second=ids["node1"])
    killed: list[str] = []

    def drop(src, dst, msg) -> bool:
        if isinstance(msg, P.Token) and msg.step == 10 and not killed:
            killed.append("both")
            loop = asyncio.get_running_loop()
            loop.call_soon(net.kill, "node0")
            loop.call_soon(net.kill, "node2")
        return False

    net.drop = drop

    async def go():
        net.generate("node2", _request(session))
        while not killed:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        node1 = net.node("node1")
        seen = {t.step for t in net.streamed()}
        node1._dispatch(P.Attach(session, "", len(seen)),
                        _origin(b"client"))
        return await asyncio.wait_for(net.end(60), 60)

    end = asyncio.run(go())
    s = end.summary
    assert isinstance(end, P.End), end
    assert s["token_ids"] == reference and s["leader"] == "node1"
    by_step: dict[int, str] = {}
    for t in net.streamed():
        by_step.setdefault(t.step, t.text)
    assert sorted(by_step) == list(range(len(reference)))
    assert "".join(by_step[i] for i in sorted(by_step)) == s["text"]


@pytest.mark.timeout(120)
def test_a_cut_off_members_own_claim_does_not_depose_a_live_leader(engines, reference):
    """A member takes the leader for dead (its own link was down; the origin and the other
    member still hear the leader) and takes over in term 1. The others refuse it: the
    leader's lease holds. When its link is back it tells the live leader "I lead term 1":
    the claimer's own word, which must not depose the leader (no one would lead then).
    The leader leaves the claimer out and finishes the answer, exactly."""
    net = Net(engines)
    ids = _ids(net)
    session = session_led_by(ids["node0"], list(ids.values()), second=ids["node1"])
    cut = {"on": False}

    def drop(src, dst, msg) -> bool:
        if isinstance(msg, P.Token) and msg.step == 8 and src == net.addr("node0") \
                and not cut["on"]:
            cut["on"] = True
            loop = asyncio.get_running_loop()
            loop.call_soon(net.node("node1")._peer_gone, ids["node0"], "")
            loop.call_later(0.3, net.hello, "node0")   # node1 hears node0 again
        return False

    net.drop = drop
    roles1, claims = net.node("node1").roles, []
    run_leader = roles1._run_leader

    async def spy(session_id, leader):               # node1's takeover, however short
        claims.append(leader)
        return await run_leader(session_id, leader)

    roles1._run_leader = spy

    async def go():
        net.generate("node2", _request(session))
        return await asyncio.wait_for(net.end(30), 30)

    end = asyncio.run(go())
    s = end.summary
    assert cut["on"] and len(claims) == 1
    claimer = claims[0]
    # the origin's word deposes the claimer (it names the leader the claimer left behind)
    assert claimer.deposed is not None and claimer.deposed.leader == ids["node0"]
    assert session not in net.node("node1").roles.leading
    assert isinstance(end, P.End) and end.reason in ("eos", "length"), end
    assert s["token_ids"] == reference
    assert s["leader"] == "node0" and s.get("term", 0) == 0
    assert "node1" not in s["members"]
    assert [t.step for t in net.streamed()] == list(range(len(reference)))
    assert "".join(t.text for t in net.streamed()) == s["text"]


@pytest.mark.timeout(120)
def test_a_claimers_own_deposed_is_no_vote(engines, reference):
    """A member that claims the session for itself ("node1 leads term 1", from node1) is
    one voice for its own claim: the leader, whose origin and other member still follow
    it, leaves that member out and goes on; only the origin, or a member that follows the
    claim, deposes it."""
    net = Net(engines)
    ids = _ids(net)
    session = session_led_by(ids["node0"], list(ids.values()), second=ids["node1"])
    sent = {"on": False}

    def drop(src, dst, msg) -> bool:
        if isinstance(msg, P.Token) and msg.step == 8 and not sent["on"]:
            sent["on"] = True
            sent["leader"] = net.node("node0").roles.leading[session]
            asyncio.get_running_loop().call_soon(
                net.deliver, net.addr("node1"), net.addr("node0"),
                P.Deposed(session, ids["node1"], 1))
        return False

    net.drop = drop

    async def go():
        net.generate("node2", _request(session))
        return await asyncio.wait_for(net.end(30), 30)

    end = asyncio.run(go())
    s = end.summary
    assert sent["on"] and sent["leader"].deposed is None
    assert s["token_ids"] == reference and s["leader"] == "node0"
    assert "node1" not in s["members"]
    assert [t.step for t in net.streamed()] == list(range(len(reference)))


@pytest.mark.parametrize("lost", ["while-taken-for-dead", "last", "end"])
@pytest.mark.timeout(120)
def test_an_origin_never_ends_a_stream_with_a_hole(engines, reference, lost):
    """Tokens to the origin are lost (the leader took it for dead a moment and sent it
    nothing; or the last Token was lost; or the End, after which the leader has nothing
    more to send), and so is its first request for a replay. The origin asks again until
    the pieces come, and holds the End until they have: the client sees every piece
    once, and its End."""
    net = Net(engines)
    ids = _ids(net)
    session = session_led_by(ids["node0"], list(ids.values()))
    origin = net.addr("node2")
    last = len(reference) - 1
    gone = {last} if lost == "last" else set()
    end_lost = {"on": lost == "end"}
    attaches: list[int] = []
    cut = {"on": False}

    def drop(src, dst, msg) -> bool:
        if dst == origin and isinstance(msg, P.End) and end_lost["on"]:
            end_lost["on"] = False               # lost once; a replay gets through
            return True
        if lost == "while-taken-for-dead" and dst == origin and isinstance(msg, P.Token) \
                and msg.step == 10 \
                and not cut["on"]:
            cut["on"] = True                     # the leader takes node2 for dead ...
            loop = asyncio.get_running_loop()
            loop.call_soon(net.node("node0")._peer_gone, ids["node2"], "")
            loop.call_later(0.05, net.hello, "node2")   # ... and hears it again
            return True
        if dst == origin and isinstance(msg, P.Token) and msg.step in gone:
            gone.discard(msg.step)               # lost once; a replay gets through
            return True
        if src == origin and isinstance(msg, P.Attach):
            attaches.append(msg.next_step)
            return len(attaches) == 1            # the first request is lost too
        return False

    net.drop = drop

    async def go():
        net.generate("node2", _request(session))
        return await asyncio.wait_for(net.end(30), 30)

    end = asyncio.run(go())
    s = end.summary
    assert isinstance(end, P.End) and s["token_ids"] == reference
    assert len(attaches) >= 2 and not gone and not end_lost["on"]
    assert cut["on"] == (lost == "while-taken-for-dead")
    assert [t.step for t in net.streamed()] == list(range(len(reference)))
    assert "".join(t.text for t in net.streamed()) == s["text"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["stream", "rank"])    # an id session; a text session
def test_a_member_cut_off_with_a_minority_keeps_its_session_until_the_sweep(
        engines, mode, monkeypatch):
    """One rule for id and text sessions: the leader and another member die together;
    the last member sees a minority of the session and not its origin, so it abstains
    (no second leader) but keeps its state (a healed partition finds it ready). Only when
    no leader has spoken to it for MEMBER_IDLE_S does the member sweep free it."""
    from dwarfmesh.sessions import roles, text_table

    net = Net(engines)
    ids = _ids(net)
    session = session_led_by(ids["node0"], list(ids.values()), second=ids["node1"])
    killed: list[str] = []

    def drop(src, dst, msg) -> bool:
        if isinstance(msg, (P.Token, P.Commit)) and msg.step == 1 and not killed:
            killed.append("both")
            loop = asyncio.get_running_loop()
            loop.call_soon(net.kill, "node0")
            loop.call_soon(net.kill, "node1")
        return False

    net.drop = drop
    node2 = net.node("node2")
    tables = node2.roles.member_of if mode == "stream" else node2.roles.text.members

    async def go() -> tuple[bool, bool, bool]:
        net.generate("node0", P.Generate(session, PROMPT, GenParams(
            max_tokens=TOKENS, weights="equal", mode=mode), [], session))
        while not killed:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        member = tables.get(session)
        kept = member is not None and not member.closed and not member.taken_over
        await node2.roles.sweep()                  # not idle yet: kept
        kept_after_sweep = session in tables
        monkeypatch.setattr(roles, "MEMBER_IDLE_S", 0.0)
        monkeypatch.setattr(text_table, "MEMBER_IDLE_S", 0.0)
        await node2.roles.sweep()
        return kept, kept_after_sweep, session in tables

    kept, kept_after_sweep, still = asyncio.run(asyncio.wait_for(go(), 60))
    assert kept and kept_after_sweep
    assert not still
    assert session not in node2.roles.leading and session not in node2.roles.text.leading
