"""Ensembles across different tokenizers: rank and string-aligned fuse modes.

The meshes run tiny random-weight GGUFs whose byte-level BPE tokenizers differ
(conftest's `mixed_ggufs`: vocab sizes 320, 400, 288, so one text encodes to different
ids) on the machine's default engine (`--engine auto`: llama.cpp on a CPU-only machine).
Every check compares what the mesh did with a computation made here from scratch on that
engine (`reference.direct_for`: a full forward over the whole committed text, no reuse
of a KV cache). The in-process engine tests and the two whose subject exists only on mlx
(mlx-lm's rotating cache) run the mlx engine on `mixed_models`, the same kind of models
as mlx-lm directories."""

from __future__ import annotations

import asyncio
import math
import signal
from types import SimpleNamespace

import numpy as np
import pytest
from meshutil import generate_cli, mesh, peers_of, session_led_by, stop
from reference import Direct, direct_for, fused_greedy

import dwarfmesh  # noqa: F401  (OpenBLAS preload before mlx, as in test_mesh.py)
from dwarfmesh.engine import Engine
from dwarfmesh.fusion import text as tf
from dwarfmesh.mesh.membership import rank_for_session
from dwarfmesh.sessions.text_leader import RANK_CHUNK_TOKENS
from dwarfmesh.ui.client import MeshClient
from dwarfmesh.wire.protocol import GenParams

PROMPT = "def quicksort(xs):"


pytestmark = pytest.mark.usefixtures("own_model_cache")


@pytest.fixture(scope="module")
def mixed_mesh(own_model_cache, mixed_ggufs, tmp_path_factory):
    cache = tmp_path_factory.mktemp("mixed-mesh")
    with mesh(mixed_ggufs, cache) as (addrs, _procs):
        yield addrs, cache


@pytest.fixture(scope="module")
def direct(own_model_cache, mixed_ggufs):
    """From-scratch references of the meshes' models, by model name."""
    return {p.stem: direct_for(p) for p in mixed_ggufs}


@pytest.fixture(scope="module")
def mlx_direct(mixed_models):
    """From-scratch mlx references of `mixed_models`, by directory name."""
    return {p.name: Direct(p) for p in mixed_models}


def by_node(summary: dict, direct: dict) -> dict[str, Direct]:
    return {name: direct[model] for name, model in summary["models"].items()}


# --- the wire ---------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_text_messages_round_trip_the_codec():
    from dwarfmesh.wire import protocol as P

    params = GenParams(max_tokens=5, mode="rank")
    samples = [
        P.TextOpen("s", "n1", "n2", ["n1", "n2"], params, False, "rank", "def f(x):",
                   [{"role": "user", "content": "hi"}], 12),
        P.Proposal("s", 3, "n1", (1 << 64) - 1, " quick", False, 17, 1.25, 4.5),
        P.Candidates("s", 3, [" quick", ""], [False, True]),
        P.Scores("s", 3, "n1", 7, [3.5, 0.25], 2.0),
        P.TextFrame("s", 4, "n2", 7, 0.125, -3.0, -0.5, None, 1.5, ["a", " b"],
                    np.array([-0.5, -1.5], dtype=np.float16)),
        P.Commit("s", 4, " b", 9, True, 1),
    ]
    for msg in samples:
        back = P.decode(P.encode(msg))
        assert type(back) is type(msg)
        for name, value in vars(msg).items():
            got = getattr(back, name)
            assert (np.array_equal(got, value) if isinstance(value, np.ndarray)
                    else got == value), name
    assert GenParams().mode == "auto"
    with pytest.raises(P.ProtocolError, match="unknown mode"):   # refused on arrival
        P.decode(P.encode(P.Generate("r", "p", GenParams(mode="vote"), [], "")))


# --- the engine's text state, in process -----------------------------------------------------


@pytest.mark.timeout(120)
def test_engine_text_state_equals_a_fresh_prefill_after_every_resync(mixed_models, mlx_direct):
    path = mixed_models[1]
    engine, ref = Engine(path), mlx_direct[path.name]
    engine.load_sync()
    opened = engine.text_open_sync("s", PROMPT, False)
    assert opened.logp == pytest.approx(-ref.nll(PROMPT), rel=1e-5)
    text = PROMPT
    # pieces that split what this tokenizer would merge: re-encoding changes earlier ids
    for piece in ["\n", "    ", "i", "f len", "(xs) <", "= 1:", "\n        return xs", " qu"]:
        out = engine.text_extend_sync("s", piece)
        assert out.logp == pytest.approx(ref.nll(text) - ref.nll(text + piece), rel=1e-4,
                                         abs=1e-3)
        text += piece
        s = engine._sessions["s"]
        assert s.tokens == ref.tok.encode(text)
        fresh = ref.logprobs(s.tokens)[-1]
        assert np.abs(np.array(s.logprobs) - fresh).max() < 1e-3
    before = np.array(engine._sessions["s"].logprobs)
    cands, eos = [" if", "\n", "", "ick brown", "icksort", "a"], [False, False, True, True,
                                                                   False, False]
    held = ref.tok.encode(text)
    merged = [c for c in cands if ref.tok.encode(text + c)[:len(held)] != held]
    assert merged, "no candidate re-encodes the committed text: the test would miss that case"
    nll = engine.score_sync("s", cands, eos)
    assert nll == pytest.approx([ref.continuation_nll(text, c, e) for c, e in zip(cands, eos)],
                                rel=1e-4, abs=1e-3)
    proposed = engine.propose_sync("s", RANK_CHUNK_TOKENS)
    assert (proposed.text, proposed.eos) == ref.proposal(text, RANK_CHUNK_TOKENS)
    # scoring and proposing leave the committed state as it was
    assert engine.text_extend_sync("s", " x").logp == pytest.approx(
        ref.nll(text) - ref.nll(text + " x"), rel=1e-4, abs=1e-3)
    assert np.abs(before - ref.logprobs(ref.tok.encode(text))[-1]).max() < 1e-3
    top = engine.text_topk_sync("s", 16)
    probs, eos_logp, rest = ref.top_texts(text + " x", 16)
    assert top.texts == list(probs)
    assert np.exp(top.logprobs.astype(np.float64)) == pytest.approx(list(probs.values()),
                                                                      rel=2e-3)
    assert top.eos_logp == pytest.approx(eos_logp, abs=1e-4)
    assert top.rest_mass == pytest.approx(rest, abs=1e-4)
    engine.shutdown()


@pytest.mark.timeout(120)
def test_sliding_window_model_resyncs_and_reuses_past_its_window(tmp_path):
    """gemma-3's layout (local layers with a window, here 8 tokens; 512 in the real model):
    mlx-lm's rotating cache cannot be trimmed once it has wrapped, which every text re-sync,
    proposal and conversation turn needs. The engine's cache must give the same numbers as
    a from-scratch forward far past the window, on both paths."""
    from tiny import make_tiny_model

    path = make_tiny_model(tmp_path / "gemma", 5, window=8)
    engine, ref = Engine(path), Direct(path)
    engine.load_sync()
    text = PROMPT
    assert engine.text_open_sync("s", text, False).logp == pytest.approx(-ref.nll(text),
                                                                          rel=1e-4)
    for piece in ["\n    if len", "(xs) <= 1:\n", "        return xs\n", "The quick brown",
                  " fox jumps over the lazy dog.", " 0123456789\n"] * 2:
        out = engine.text_extend_sync("s", piece)
        assert out.logp == pytest.approx(ref.nll(text) - ref.nll(text + piece), rel=1e-3,
                                         abs=2e-3)
        text += piece
    assert len(engine._sessions["s"].tokens) > 8 * 8
    cands = [" if", "\n", "The lazy fox"]
    assert engine.score_sync("s", cands, [False] * 3) == pytest.approx(
        [ref.continuation_nll(text, c, False) for c in cands], rel=1e-3, abs=2e-3)
    assert (engine.propose_sync("s", RANK_CHUNK_TOKENS).text,
            False) == ref.proposal(text, RANK_CHUNK_TOKENS)
    # the id path: a second turn reuses the first turn's cache past the window
    ids = ref.tok.encode(text)
    engine.open_sync("t", ids[:-20], 8)
    engine.close_sync("t", keep=True)
    second = engine.open_sync("t", ids, 8)
    assert second.reused == len(ids) - 20
    fresh = ref.logprobs(ids)[-1]
    assert np.abs(np.array(engine._sessions["t"].logprobs) - fresh).max() < 2e-3
    engine.shutdown()


# --- rank mode across tokenizers -------------------------------------------------------------


@pytest.mark.timeout(300)
def test_rank_mode_commits_a_proposal_per_round_scored_exactly(mixed_mesh, direct):
    addrs, cache = mixed_mesh
    max_tokens = 100
    out = generate_cli(addrs[0], PROMPT, "--mode", "rank", "--max-tokens", str(max_tokens),
                       cache=cache)
    assert out["mode"] == "rank"
    assert sorted(out["members"]) == ["node0", "node1", "node2"] and out["excluded"] == []
    assert len(set(out["models"].values())) == 3
    ref = by_node(out, direct)
    assert out["steps"] == len(out["trace"]) >= 2
    committed = ""
    for step in out["trace"]:
        cands = [tuple(c) for c in step["candidates"]]
        chosen = cands[step["chosen"]]
        assert list(chosen) in step["proposals"].values()    # exactly one member's proposal
        # each member's state after re-syncing equals a fresh prefill of the committed text:
        # its proposal is the greedy continuation computed from scratch (max_tokens counts
        # each member's own tokens)
        for name, proposal in step["proposals"].items():
            budget = min(RANK_CHUNK_TOKENS, max_tokens - len(ref[name].tok.encode(committed)))
            assert tuple(proposal) == ref[name].proposal(PROMPT + committed, budget), name
        # the scores the leader used are the members' exact NLLs of each candidate
        names = list(step["nll"])
        assert sorted(names) == sorted(out["members"])
        for name in names:
            want = [ref[name].continuation_nll(PROMPT + committed, t, e) for t, e in cands]
            assert step["nll"][name] == pytest.approx(want, rel=ref[name].nll_rel,
                                                      abs=ref[name].nll_abs), name
        best, _ = tf.choose_candidate(np.array([step["nll"][n] for n in names]),
                                      np.array([step["weights"][n] for n in names]), cands)
        assert best == step["chosen"]
        committed += chosen[0]
    assert committed == out["text"]
    assert out["finish_reason"] == "length"
    assert max(len(r.tok.encode(committed)) for r in ref.values()) >= max_tokens
    assert out["wire_bytes"] > 0 and out["committed_bytes"] == len(out["text"].encode())
    assert sum(out["weights"].values()) == pytest.approx(1.0)


@pytest.mark.timeout(300)
def test_stream_mode_with_mixed_tokenizers_ranks_the_same_whoever_leads(mixed_mesh):
    addrs, _cache = mixed_mesh
    ids = {n["name"]: n["node_id"] for n in peers_of(addrs[2])}

    async def ask(session: str) -> dict:
        async with MeshClient(addrs[2]) as c:
            return (await c.generate(PROMPT, GenParams(
                mode="stream", max_tokens=16), conversation=session)
                    ).summary
    outs = [asyncio.run(ask(session_led_by(ids[name], list(ids.values()))))
            for name in ("node0", "node1")]
    assert [o["leader"] for o in outs] == ["node0", "node1"]
    for out in outs:
        assert out["mode"] == "rank" and out["excluded"] == []
        assert sorted(out["members"]) == ["node0", "node1", "node2"]
    assert outs[0]["text"] == outs[1]["text"] != ""


# --- fuse mode across tokenizers -------------------------------------------------------------


@pytest.mark.timeout(300)
def test_fuse_mode_aligns_members_by_string(mixed_mesh, direct):
    addrs, cache = mixed_mesh
    k = 16
    out = generate_cli(addrs[1], PROMPT, "--mode", "fuse", "--max-tokens", "20", "--top-k",
                       str(k), cache=cache)
    assert out["mode"] == "fuse-text" and sorted(out["members"]) == ["node0", "node1", "node2"]
    ref = by_node(out, direct)
    assert out["steps"] == len(out["trace"]) == 20
    committed = ""
    for step in out["trace"]:
        names = list(step["top"])
        frames = []
        for name in names:
            probs, eos_logp, rest = ref[name].top_texts(PROMPT + committed, k)
            # the member's state equals a fresh prefill: same top strings, same log-probs
            top = step["top"][name]
            assert [t for t, _ in top] == list(probs)[:4], name
            assert [lp for _, lp in top] == pytest.approx(
                [math.log(p) for p in list(probs.values())[:4]], abs=2e-2)
            assert step["eos_logp"][name] == pytest.approx(eos_logp, abs=ref[name].logp_abs)
            lps = np.log(np.array(list(probs.values()))).astype(np.float16)
            frames.append(tf.TextTopK(list(probs), lps, eos_logp, rest, ref[name].vocab_size))
        fused = tf.fuse_texts(frames, np.array([step["weights"][n] for n in names]), "linear")
        chosen = fused.candidates.index((step["piece"], step["eos"]))
        assert fused.probs[chosen] >= fused.probs.max() - 1e-6      # the argmax (or a tie)
        committed += step["piece"]
    assert committed == out["text"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["rank", "fuse"])
def test_a_text_session_stops_at_the_earliest_stop_string_as_an_id_session_does(mixed_mesh,
                                                                                 mode):
    """Stop strings end a text answer where the first of them starts in the text, whatever
    their order on the command line (the rule `textcut.stop_at` gives id sessions too):
    two stops that first appear in one committed piece, the later one listed first, cut
    at the earlier."""
    addrs, cache = mixed_mesh
    base = generate_cli(addrs[0], PROMPT, "--mode", mode, "--max-tokens", "40", cache=cache)
    text, offset, pick = base["text"], 0, None
    for step in base["trace"]:
        piece = (step["candidates"][step["chosen"]][0] if mode == "rank" else step["piece"])
        n = 2 if len(piece) >= 4 else 1
        early, late = piece[:n], piece[-n:]
        if (len(piece) >= 2 and text.find(early) == offset
                and text.find(late) == offset + len(piece) - n > offset):
            pick = early, late
            break
        offset += len(piece)
    assert pick, f"no piece holds two stops that first appear in it: {base['trace']}"
    early, late = pick
    out = generate_cli(addrs[0], PROMPT, "--mode", mode, "--max-tokens", "40",
                       "--stop", late, "--stop", early, cache=cache)
    assert out["finish_reason"] == "stop"
    assert out["text"] == text[:text.find(early)]


# --- one tokenizer: stream is the id path ------------------------------------------------------


@pytest.mark.timeout(300)
def test_same_tokenizer_stream_mode_takes_the_id_path_unchanged(tiny_ggufs_shared, tmp_path):
    from dwarfmesh.engine.choose import make_engine

    k, n = 16, 12
    with mesh(tiny_ggufs_shared[:2], tmp_path) as (addrs, _procs):
        auto = generate_cli(addrs[0], PROMPT, "--max-tokens", str(n), "--weights", "equal",
                            "--top-k", str(k), cache=tmp_path)
        fuse = generate_cli(addrs[1], PROMPT, "--max-tokens", str(n), "--weights", "equal",
                            "--top-k", str(k), "--mode", "fuse", cache=tmp_path)
    assert auto["mode"] == fuse["mode"] == "fuse-ids"
    # the same engines the nodes run (`--engine auto`), fused here without the mesh
    engines = [make_engine(str(p), pull=False)[0] for p in tiny_ggufs_shared[:2]]
    for e in engines:
        e.load_sync()
    try:
        expected = fused_greedy(engines, PROMPT, n, k)
    finally:
        for e in engines:
            e.shutdown(wait=True)
    assert auto["token_ids"] == fuse["token_ids"] == expected


# --- a member dies mid-answer ----------------------------------------------------------------


def answer(address: str, session: str, params: GenParams, on_text=None):
    """One answer to PROMPT through MeshClient, as conversation `session` (deadline 240 s)."""
    async def go():
        async with MeshClient(address) as c:
            return await asyncio.wait_for(c.generate(PROMPT, params, on_text=on_text,
                                                     conversation=session), 240)
    return asyncio.run(go())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["rank", "fuse"])
def test_a_member_dies_and_the_text_session_goes_on(mixed_ggufs, tmp_path, mode):
    with mesh(mixed_ggufs, tmp_path) as (addrs, procs):
        ids = {n["name"]: n["node_id"] for n in peers_of(addrs[0])}
        session = session_led_by(ids["node0"], list(ids.values()))
        pieces: list[str] = []

        def on_text(piece: str) -> None:
            pieces.append(piece)
            if len(pieces) == 1:
                stop([procs[2]], signal.SIGKILL)

        result = answer(addrs[0], session, GenParams(max_tokens=120, mode=mode), on_text)
    s = result.summary
    assert s["leader"] == "node0" and s["dropped"] == ["node2"]
    assert sorted(s["members"]) == ["node0", "node1"]
    assert s["finish_reason"] in ("length", "eos")
    assert "".join(pieces) == result.text and len(pieces) == s["steps"] > 1


@pytest.mark.timeout(300)
@pytest.mark.parametrize("leader", ["node0", "node1"])
def test_a_member_whose_cache_cannot_trim_leaves_and_the_session_goes_on(
        mixed_models, tmp_path, leader):
    """llama with sliding-window layers keeps mlx-lm's rotating cache (only architectures
    known to mask by window get a plain one), which cannot be trimmed once it wraps: that
    member must leave with a reason, and the others finish the answer, also when the member
    that leaves is the leader's own (its Leave is dispatched locally). On mlx, because only
    mlx has such a cache (llama.cpp keeps a sliding window in full, always trimmable)."""
    from tiny import make_tiny_model

    sliding = make_tiny_model(tmp_path / "swa", 21, vocab_size=288, window=4, arch="llama")
    with mesh([sliding, mixed_models[0]], tmp_path, extra=["--engine", "mlx"]) as (addrs,
                                                                                 _procs):
        ids = {n["name"]: n["node_id"] for n in peers_of(addrs[0])}
        session = session_led_by(ids[leader], list(ids.values()))

        result = answer(addrs[1], session, GenParams(max_tokens=24, mode="rank"))
    s = result.summary
    assert s["leader"] == leader and s["mode"] == "rank"
    assert s["dropped"] == ["node0"] and s["members"] == ["node1"]
    assert s["finish_reason"] in ("length", "eos") and result.text


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["rank", "fuse"])
def test_a_straggler_in_a_text_session_is_decided_around_and_comes_back(mixed_ggufs,
                                                                          tmp_path, mode):
    """A member frozen for 1.5 s (SIGSTOP) under --step-deadline: the leader decides each
    step with the replies in hand, counts the member's late steps, keeps it in the session,
    and once thawed it answers again (its proposals / frames are back in the trace)."""
    import os

    with mesh(mixed_ggufs, tmp_path, extra=["--step-deadline", "400"]) as (addrs, procs):
        ids = {n["name"]: n["node_id"] for n in peers_of(addrs[0])}
        session = session_led_by(ids["node0"], list(ids.values()))
        pieces: list[str] = []
        stalled_at: list[int] = []

        def on_text(piece: str) -> None:
            pieces.append(piece)
            if len(pieces) == 2:
                stalled_at.append(len(pieces))
                os.killpg(procs[2].pid, signal.SIGSTOP)
                asyncio.get_running_loop().call_later(
                    1.5, lambda: os.killpg(procs[2].pid, signal.SIGCONT))

        result = answer(addrs[0], session, GenParams(max_tokens=400, mode=mode), on_text)
    s = result.summary
    assert s["leader"] == "node0" and s["dropped"] == [] and "node2" in s["members"]
    assert s["late"].get("node2", 0) >= 2
    assert "".join(pieces) == result.text
    key = "proposals" if mode == "rank" else "top"
    answered = [step["step"] for step in s["trace"] if "node2" in step[key]]
    assert answered[0] < stalled_at[0] and answered[-1] > stalled_at[0] + s["late"]["node2"]


def kill_after_first_piece(proc):
    """on_text for `answer`: SIGKILL `proc` once the first committed piece has arrived."""
    pieces: list[str] = []

    def on_text(piece: str) -> None:
        pieces.append(piece)
        if len(pieces) == 1:
            stop([proc], signal.SIGKILL)
    return pieces, on_text


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["rank", "fuse"])
def test_the_text_sessions_leader_dies_and_a_member_takes_over(mixed_ggufs, tmp_path, mode):
    """The leader is SIGKILLed after the first commit: the survivor first in the session's
    rendezvous order resumes from the committed text, the other answers it, and the
    client's stream goes on with nothing lost or repeated."""
    with mesh(mixed_ggufs, tmp_path) as (addrs, procs):
        ids = {n["name"]: n["node_id"] for n in peers_of(addrs[0])}
        session = session_led_by(ids["node0"], list(ids.values()))
        pieces, on_text = kill_after_first_piece(procs[0])
        result = answer(addrs[2], session, GenParams(max_tokens=120, mode=mode), on_text)
    s = result.summary
    names = {v: k for k, v in ids.items()}
    survivors = [SimpleNamespace(node_id=ids[n]) for n in ("node1", "node2")]
    assert s["leader"] == names[rank_for_session(session, survivors)[0].node_id]
    assert sorted(s["members"]) == ["node1", "node2"] and s["mode"] == mode.replace(
        "fuse", "fuse-text")
    assert s["resumed_at_step"] >= 1 and s["finish_reason"] in ("length", "eos")
    assert "".join(pieces) == result.text
    assert len(pieces) == s["steps"] > s["resumed_at_step"]


@pytest.mark.timeout(300)
def test_the_text_clients_node_dies_and_the_stream_goes_on_elsewhere(mixed_ggufs, tmp_path):
    """The node the client talks to (not the leader) is SIGKILLed after the first commit:
    the client attaches to another node, which asks the leader to replay what it missed."""
    with mesh(mixed_ggufs, tmp_path) as (addrs, procs):
        ids = {n["name"]: n["node_id"] for n in peers_of(addrs[0])}
        session = session_led_by(ids["node1"], list(ids.values()))
        pieces, on_text = kill_after_first_piece(procs[2])
        result = answer(addrs[2], session, GenParams(max_tokens=120, mode="rank"), on_text)
    s = result.summary
    assert s["leader"] == "node1" and s["dropped"] == ["node2"]
    assert "".join(pieces) == result.text and len(pieces) == s["steps"] > 1


@pytest.mark.timeout(120)
def test_a_proposal_holds_a_whole_character(mixed_models, mlx_direct):
    """A budget that ends inside a multi-byte character (byte tokens; the tiny models'
    vocabularies are mostly bytes) does not make an empty proposal: a round where every
    member proposes nothing could not go on. The member runs on to finish the character,
    as the reference does."""
    seen_short = 0
    for path in mixed_models:
        engine, ref = Engine(path), mlx_direct[path.name]
        engine.load_sync()
        for i, prompt in enumerate(["hello", "zz", "def f(x):", "é"]):
            engine.text_open_sync(f"s{i}", prompt, False)
            for budget in (1, 2, 3):
                out = engine.propose_sync(f"s{i}", budget)
                assert out.text or out.eos, (path.name, prompt, budget)
                assert (out.text, out.eos) == ref.proposal(prompt, budget)
                seen_short += out.tokens > budget
        engine.shutdown()
    assert seen_short, "no budget ended inside a character: the test would miss that case"
