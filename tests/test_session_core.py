"""The session core in memory: leaders, members, origins and takeovers, each in milliseconds.

Real nodes (dispatch, authority, session tables, rounds, failover) in one process
(`inproc.Net`: no sockets, a network that can lose chosen messages) on the real engine
over a scripted model (`scripted.py`: no model library, a deterministic function of the
ids). What is tested is who waits for whom and what gets committed, sent and replayed;
the same behaviours on real models are in test_failover.py and test_faults.py.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from inproc import CLIENT, Net
from meshutil import session_led_by
from scripted import ONE_QUIRK, QUIRK, SCRIPT, USELESS, script_greedy, scripted_engine

from dwarfmesh.wire import protocol as P
from dwarfmesh.wire.protocol import GenParams
from dwarfmesh.wire.transport import Origin

PROMPT = "def quicksort(xs):\n"
TOKENS = 40
KILL_AFTER_S = 0.05  # a killed node's last messages arrive before its death is noticed
FAST_S = 5.0        # every answer here takes milliseconds; this bounds a wrong wait


@pytest.fixture()
def engines(tmp_path, monkeypatch):
    monkeypatch.setenv("DWARFMESH_STATE", str(tmp_path))
    out = [scripted_engine(variant=i) for i in range(3)]    # node{i} runs variant i
    yield out
    for e in out:
        e.shutdown(wait=True)


REFERENCE = script_greedy(PROMPT, TOKENS)


def _ids(net: Net) -> dict[str, str]:
    return {n.opts.name: n.node_id for n in net.nodes.values()}


def _request(session: str) -> P.Generate:
    return P.Generate(session, PROMPT, GenParams(
        mode="stream", max_tokens=TOKENS, weights="equal"), [],
                      session)


def _run(net: Net, via: str, session: str, after=None) -> tuple[P.End, float]:
    async def go() -> P.End:
        net.generate(via, _request(session))
        if after is not None:
            await after()
        return await asyncio.wait_for(net.end(FAST_S), FAST_S)
    t0 = time.perf_counter()
    end = asyncio.run(go())
    assert isinstance(end, P.End), end
    return end, time.perf_counter() - t0


def _stream_is_exact(net: Net, summary: dict) -> None:
    by_step: dict[int, str] = {}
    for t in net.streamed():
        by_step.setdefault(t.step, t.text)
    assert sorted(by_step) == list(range(len(REFERENCE)))
    assert "".join(by_step[i] for i in sorted(by_step)) == summary["text"]


@pytest.mark.timeout(30)
def test_a_plain_answer_is_the_scripted_models_own(engines):
    net = Net(engines)
    ids = _ids(net)
    end, took = _run(net, "node1", session_led_by(ids["node0"], list(ids.values())))
    s = end.summary
    assert s["token_ids"] == REFERENCE and s["leader"] == "node0"
    assert sorted(s["members"]) == ["node0", "node1", "node2"] and s["dropped"] == []
    assert s["mode"] == "fuse-ids" and s["late"] == {} and s["steps"] == TOKENS
    _stream_is_exact(net, s)
    assert took < FAST_S


@pytest.mark.timeout(30)
def test_a_round_goes_on_without_a_late_member_which_stays(engines):
    """--step-deadline: one member's forward at one step takes far longer than the
    deadline. The round is decided with the others' frames; the late one is counted, not
    dropped, and is in every later round again (the answer is still exact)."""
    prompt_len = len(PROMPT.encode())
    engines[2].backend.delay(prompt_len + 5, 0.4)
    net = Net(engines, step_deadline_s=0.05)
    ids = _ids(net)
    end, _ = _run(net, "node1", session_led_by(ids["node0"], list(ids.values())))
    s = end.summary
    assert s["token_ids"] == REFERENCE
    assert s["late"].get("node2", 0) >= 1
    assert s["late"]["node2"] < TOKENS // 2            # caught up, not late ever after
    assert "node2" in s["members"] and s["dropped"] == []


@pytest.mark.timeout(30)
def test_a_dead_member_is_dropped_and_the_answer_goes_on(engines):
    net = Net(engines)
    ids = _ids(net)
    session = session_led_by(ids["node0"], list(ids.values()))
    leader = net.addr("node0")

    def drop(src, dst, msg) -> bool:
        if src == leader and isinstance(msg, P.Token) and msg.step == 5 and dst == net.addr(
                "node2"):
            asyncio.get_running_loop().call_soon(net.kill, "node2")
            return True
        return False

    net.drop = drop
    end, _ = _run(net, "node1", session)
    s = end.summary
    assert s["token_ids"] == REFERENCE
    assert sorted(s["members"]) == ["node0", "node1"] and s["dropped"] == ["node2"]
    _stream_is_exact(net, s)


@pytest.mark.timeout(30)
def test_the_next_member_by_rank_takes_over_from_a_dead_leader(engines):
    net = Net(engines)
    ids = _ids(net)
    session = session_led_by(ids["node0"], list(ids.values()), second=ids["node1"])
    sent: set[str] = set()

    def drop(src, dst, msg) -> bool:
        if src == net.addr("node0") and isinstance(msg, P.Token) and msg.step == 8:
            sent.add(dst)
            if len(sent) == 2:              # both members (one is the origin) have it: die
                asyncio.get_running_loop().call_soon(net.kill, "node0")
        return False

    net.drop = drop
    end, _ = _run(net, "node2", session)
    s = end.summary
    assert s["token_ids"] == REFERENCE
    assert s["leader"] == "node1" and s["term"] == 1
    assert sorted(s["members"]) == ["node1", "node2"]
    _stream_is_exact(net, s)


def _lose_last_token_then_take_over(engines, step: int, lost_to: str) -> None:
    """The leader (node0) sends its Token for `step` to both members but it is lost to
    `lost_to`; then the leader dies (after the other took the Token in: a dead node's last
    messages arrive before its death is noticed; meanwhile it waits for `lost_to`'s
    frame). node1 takes over; the answer must be exact, with both members still in."""
    net = Net(engines)
    ids = _ids(net)
    session = session_led_by(ids["node0"], list(ids.values()), second=ids["node1"])
    sent: set[str] = set()

    def drop(src, dst, msg) -> bool:
        if src == net.addr("node0") and isinstance(msg, P.Token) and msg.step == step:
            sent.add(dst)
            if len(sent) == 2:
                asyncio.get_running_loop().call_later(KILL_AFTER_S, net.kill, "node0")
            return dst == net.addr(lost_to)
        return False

    net.drop = drop
    end, _ = _run(net, "node2", session)
    s = end.summary
    assert s["token_ids"] == REFERENCE and s["leader"] == "node1" and s["term"] == 1
    assert sorted(s["members"]) == ["node1", "node2"]
    _stream_is_exact(net, s)


@pytest.mark.timeout(30)
def test_a_new_leader_sends_a_member_the_token_it_missed(engines):
    """The dead leader's last Token reached the member that takes over but not the other
    one: the new leader sends that member the Token it lacks, and the member stays."""
    _lose_last_token_then_take_over(engines, 10, lost_to="node2")


@pytest.mark.timeout(30)
def test_a_new_leader_adopts_a_token_that_reached_only_some(engines):
    """The other way round: the dead leader's last Token reached a member but not the one
    that takes over. That member's frame is a step ahead and says which token it holds
    (`last_token`); the new leader adopts it as committed (the client may have streamed
    it already) instead of choosing again, so nothing is lost, repeated or changed."""
    step = 12        # where node1's variant alone would choose otherwise (scripted.py)
    assert (len(PROMPT.encode()) + step) % 3 == 1
    _lose_last_token_then_take_over(engines, step, lost_to="node1")


@pytest.mark.timeout(30)
def test_a_client_reattached_through_another_node_gets_what_it_missed(engines):
    """The client's node dies mid-answer; the client attaches to another node, which
    becomes the origin: the leader replays every piece from the first one the client
    lacks, then streams the rest."""
    net = Net(engines)
    ids = _ids(net)
    session = session_led_by(ids["node0"], list(ids.values()))
    killed: list[str] = []

    def drop(src, dst, msg) -> bool:
        if isinstance(msg, P.Token) and msg.step == 12 and not killed:
            killed.append("node2")
            asyncio.get_running_loop().call_soon(net.kill, "node2")
            return dst == net.addr("node2")
        return False

    net.drop = drop

    async def reattach() -> None:
        while not killed:
            await asyncio.sleep(0.001)
        seen = {t.step for t in net.streamed()}
        assert seen and seen == set(range(len(seen)))
        net.node("node1")._dispatch(P.Attach(session, "", len(seen)),
                                    Origin("router", CLIENT, "127.0.0.1", None, 100))

    end, _ = _run(net, "node2", session, after=reattach)
    s = end.summary
    assert s["token_ids"] == REFERENCE and s["leader"] == "node0"
    _stream_is_exact(net, s)


# --- text sessions (rank mode over the scripted model's copies: byte tokens, no quirks) ---

SCRIPT_TEXT = SCRIPT.decode()[len(PROMPT):]


@pytest.fixture()
def copies(tmp_path, monkeypatch):
    monkeypatch.setenv("DWARFMESH_STATE", str(tmp_path))
    out = [scripted_engine() for _ in range(3)]
    yield out
    for e in out:
        e.shutdown(wait=True)


def _rank(net: Net, via: str, session: str) -> P.End:
    async def go() -> P.End:
        net.generate(via, P.Generate(session, PROMPT, GenParams(
            max_tokens=TOKENS, mode="rank"), [], session))
        return await asyncio.wait_for(net.end(FAST_S), FAST_S)
    end = asyncio.run(go())
    assert isinstance(end, P.End), end
    return end


@pytest.mark.timeout(30)
def test_a_rank_answer_over_copies_is_the_scripted_text(copies):
    net = Net(copies)
    ids = _ids(net)
    s = _rank(net, "node1", session_led_by(ids["node0"], list(ids.values()))).summary
    assert s["mode"] == "rank" and s["leader"] == "node0" and s["steps"] > 1
    assert s["text"] and SCRIPT_TEXT.startswith(s["text"])
    assert "".join(t.text for t in net.streamed()) == s["text"]


@pytest.mark.timeout(30)
def test_a_new_text_leader_adopts_a_commit_that_reached_only_some(copies):
    """The text form: the dead leader's Commit for step 1 reached the client's node (a
    member) but not the member that takes over. The new leader takes it from the member
    that has it (the client may have shown it) and goes on from there."""
    net = Net(copies)
    ids = _ids(net)
    session = session_led_by(ids["node0"], list(ids.values()), second=ids["node1"])
    old_piece: list[str] = []
    sent: set[str] = set()

    def drop(src, dst, msg) -> bool:
        if src == net.addr("node0") and isinstance(msg, P.Commit) and msg.step == 1:
            old_piece[:] = [msg.text]
            sent.add(dst)
            if len(sent) == 2:
                asyncio.get_running_loop().call_later(KILL_AFTER_S, net.kill, "node0")
            return dst == net.addr("node1")
        return False

    net.drop = drop
    s = _rank(net, "node2", session).summary
    pieces = [t.text for t in net.streamed()]
    assert s["leader"] == "node1" and s["term"] == 1
    assert sorted(s["members"]) == ["node1", "node2"]
    assert s["adopted_steps"] == 1 and s["resumed_at_step"] == 2
    assert old_piece and pieces[1] == old_piece[0]
    assert "".join(pieces) == s["text"] and SCRIPT_TEXT.startswith(s["text"])


def _auto(net: Net, via: str, session: str, **params) -> P.End:
    async def go() -> P.End:
        net.generate(via, P.Generate(session, PROMPT, GenParams(
            max_tokens=TOKENS, **params), [], session))
        return await asyncio.wait_for(net.end(FAST_S), FAST_S)
    end = asyncio.run(go())
    assert isinstance(end, P.End), end
    return end


@pytest.fixture()
def strong_and_useless(tmp_path, monkeypatch):
    monkeypatch.setenv("DWARFMESH_STATE", str(tmp_path))
    out = [scripted_engine(), scripted_engine(variant=USELESS)]
    yield out
    for e in out:
        e.shutdown(wait=True)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("leader", ["node0", "node1"])
def test_auto_benches_a_useless_member_and_answers_as_the_strong_one(strong_and_useless,
                                                                      leader):
    """auto over two members is select; the useless member reads the prompt far worse
    than the strong one, so it neither writes a candidate nor judges, whoever leads."""
    net = Net(strong_and_useless)
    ids = _ids(net)
    s = _auto(net, "node1", session_led_by(ids[leader], list(ids.values()))).summary
    assert s["mode"] == "select" and s["leader"] == leader
    assert s["voted"] == ["node0"] and list(s["benched"]) == ["node1"]
    assert s["strength_nll_per_byte"]["node1"] > 2 * s["strength_nll_per_byte"]["node0"]
    assert s["text"] == SCRIPT_TEXT[:TOKENS]
    assert s["select"]["chosen_by"] == ["node0"] and s["select"]["judges"] == ["node0"]
    assert "".join(t.text for t in net.streamed()) == s["text"]


@pytest.mark.timeout(30)
def test_select_keeps_the_answer_every_judge_finds_likely(copies):
    """Two copies of the script and one model that differs at one position read the
    prompt equally well, so all three vote. The odd one's answer has a byte that the
    copies find very unlikely; the script's answer is only a little less likely for the
    odd one. The answer with the best worst judge is the script's."""
    copies[2].backend.variant = ONE_QUIRK
    net = Net(copies)
    ids = _ids(net)
    s = _auto(net, "node1", session_led_by(ids["node2"], list(ids.values())),
              mode="select").summary
    assert s["mode"] == "select" and s["leader"] == "node2"
    assert sorted(s["voted"]) == ["node0", "node1", "node2"] and s["benched"] == {}
    cands = s["select"]["candidates"]
    assert sorted(map(sorted, (c["by"] for c in cands))) == [["node0", "node1"], ["node2"]]
    assert sorted(s["select"]["judges"]) == ["node0", "node1", "node2"]
    assert sorted(s["select"]["chosen_by"]) == ["node0", "node1"]
    assert s["text"] == SCRIPT_TEXT[:TOKENS] and chr(QUIRK) not in s["text"]
    odd = next(c for c in cands if c["by"] == ["node2"])
    assert chr(QUIRK) not in s["text"] and odd["bytes"] == TOKENS
    assert s["select"]["margin_nats_per_byte"] > 0
    assert odd["worst_nll_per_byte"] > odd["nll_per_byte"]["node2"]


@pytest.mark.timeout(30)
def test_a_cancelled_select_answer_stops_its_writers(copies):
    """A client that cancels while the members write their whole answers gets its End at
    once, and the members stop writing (the End interrupts the engine's loop): the next
    answer is not queued behind the rest of the cancelled one."""
    slow_from = len(PROMPT) + 4
    for e in copies:
        for pos in range(slow_from, slow_from + TOKENS):
            e.backend.delay(pos, 0.1)            # a whole answer takes 4 s per member
    net = Net(copies)
    ids = _ids(net)
    session = session_led_by(ids["node0"], list(ids.values()))

    async def go() -> tuple[P.End, float, P.End, float]:
        net.generate("node1", P.Generate(session, PROMPT, GenParams(
            max_tokens=TOKENS, mode="select"), [], session))
        await asyncio.sleep(0.3)
        t0 = time.perf_counter()
        net.node("node1")._dispatch(P.Cancel(session), Origin("router", CLIENT, "127.0.0.1",
                                                              None, 100))
        first = await asyncio.wait_for(net.end(FAST_S), FAST_S)
        cancelled_s = time.perf_counter() - t0
        net.client.clear()
        t1 = time.perf_counter()
        net.generate("node1", P.Generate("again", PROMPT, GenParams(
            max_tokens=3, mode="select"), [], "again"))
        second = await asyncio.wait_for(net.end(FAST_S), FAST_S)
        return first, cancelled_s, second, time.perf_counter() - t1

    first, cancelled_s, second, again_s = asyncio.run(go())
    assert isinstance(first, P.End) and first.reason == "cancelled"
    assert cancelled_s < 1.0
    assert isinstance(second, P.End) and second.reason == "length"
    assert second.summary["text"] == SCRIPT_TEXT[:3]
    assert again_s < 2.0                      # not behind 3+ s of a cancelled answer


@pytest.mark.timeout(30)
def test_a_select_answer_that_is_all_stop_string_is_empty(copies):
    """Every member writes the script, which a stop string cuts at once: the answer is
    empty and ends with reason stop (no candidate is left to judge)."""
    net = Net(copies)
    ids = _ids(net)
    end = _auto(net, "node1", session_led_by(ids["node0"], list(ids.values())),
                mode="select", stop=[SCRIPT_TEXT[:6]])
    assert end.reason == "stop" and end.summary["text"] == ""
