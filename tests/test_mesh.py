"""The mesh end to end: real node processes, real ZeroMQ sockets on 127.0.0.1, real models
(tiny random-weight llama GGUFs sharing one tokenizer) on the machine's default engine
(llama.cpp on a CPU-only machine, mlx elsewhere); every expected answer is computed by
that same engine directly, without the mesh."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import zmq
from meshutil import generate_cli, mesh, peers_of, stop
from reference import engine_greedy, fused_greedy

import dwarfmesh  # noqa: F401
from dwarfmesh.engine.choose import make_engine

PROMPT = "def quicksort(xs):"


pytestmark = pytest.mark.usefixtures("own_model_cache")   # tiny GGUFs' tokenizers


def direct_fused(paths, prompt: str, n_tokens: int, k: int) -> list[int]:
    """Each model's top-k from its own engine, pooled with equal weights, greedy."""
    engines = [make_engine(str(p), pull=False)[0] for p in paths]
    try:
        for e in engines:
            e.load_sync()
        return fused_greedy(engines, prompt, n_tokens, k)
    finally:
        for e in engines:
            e.shutdown(wait=True)


@pytest.mark.timeout(300)
def test_three_different_models_fuse_exactly_as_computed_directly(tiny_ggufs_shared, tmp_path):
    k, n_tokens = 16, 24
    with mesh(tiny_ggufs_shared, tmp_path) as (addrs, _procs):
        out = generate_cli(addrs[1], PROMPT, "--max-tokens", str(n_tokens), "--weights", "equal",
                           "--top-k", str(k), cache=tmp_path)
    # The same computation, without the mesh: each model's top-k, pooled with equal weights.
    expected = direct_fused(tiny_ggufs_shared, PROMPT, n_tokens, k)
    assert out["token_ids"] == expected
    assert sorted(out["members"]) == ["node0", "node1", "node2"]
    assert out["leader"] in out["members"]
    assert out["steps"] == len(expected)
    for key in ("text", "tokens_per_s", "wire_bytes_per_token", "disagreement_rate"):
        assert key in out
    assert 0.0 <= out["disagreement_rate"] <= 1.0
    # different random models disagree somewhere; the fused token is not always one model's
    assert out["disagreement_rate"] > 0
    assert 0 < out["frame_bytes_per_member_per_token"] <= 512


@pytest.mark.timeout(300)
def test_copies_of_one_model_reproduce_its_own_greedy_output(tiny_ggufs_shared, tmp_path):
    own = engine_greedy(str(tiny_ggufs_shared[0]), PROMPT, 30)
    with mesh([tiny_ggufs_shared[0]] * 3, tmp_path) as (addrs, _procs):
        out = generate_cli(addrs[2], PROMPT, "--max-tokens", "30", cache=tmp_path)
        out_loglinear = generate_cli(addrs[0], PROMPT, "--max-tokens", "30", "--fuse",
                                     "loglinear", cache=tmp_path)
    assert out["token_ids"] == own[: len(out["token_ids"])]
    assert len(out["token_ids"]) == len(own) or out["finish_reason"] == "eos"
    assert out_loglinear["token_ids"] == out["token_ids"]
    assert out["disagreement_rate"] == 0.0


@pytest.mark.timeout(300)
def test_malformed_messages_are_counted_and_the_node_keeps_serving(tiny_ggufs_shared, tmp_path):
    with mesh(tiny_ggufs_shared[:2], tmp_path) as (addrs, _procs):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 2000)     # deliver everything before close
        sock.connect(f"tcp://{addrs[0]}")
        garbage = [[b"hello"], [b"DWM1", b"\x06", b"\xc1"], [b"DWM1", b"\x06", b"\x90", b"x", b"y"],
                   [b"DWM1", b"\xff", b"\x90"], [b"DWM2", b"\x01", b"\x90"], [b""]]
        for parts in garbage:
            sock.send_multipart(parts)
        # a peer that speaks another protocol version gets a Refuse that says why
        from dwarfmesh.wire import protocol as P
        sock.send_multipart(P.encode(P.Hello("x1", "old", "m", "f", 10, 99, ":1", 1.0, [], [])))
        assert sock.poll(5000), "no answer to a wrong-version Hello"
        refusal = P.decode(sock.recv_multipart())
        assert isinstance(refusal, P.Refuse) and "version mismatch" in refusal.reason
        # a client request the node cannot read is answered with an Error, not silence
        sock.send_multipart([b"DWM1", bytes((P.Generate.TAG,)), msgpack.packb(["r", 1])])
        assert sock.poll(5000), "no answer to an unreadable Generate"
        err = P.decode(sock.recv_multipart())
        assert isinstance(err, P.Error) and "request rejected" in err.message
        sock.close()
        # an oversized message: libzmq drops the connection (MAXMSGSIZE), the node lives on
        big = ctx.socket(zmq.DEALER)
        big.setsockopt(zmq.LINGER, 2000)
        big.connect(f"tcp://{addrs[0]}")
        big.send_multipart([b"DWM1", b"\x06", b"x" * (5 << 20)])
        big.close()
        ctx.term()
        asyncio.run(asyncio.sleep(0.5))
        me = next(n for n in peers_of(addrs[0]) if n["self"])
        assert sum(me["stats"]["dropped"].values()) >= len(garbage) + 2
        assert me["stats"]["dropped"].get("refused: version") == 1
        out = generate_cli(addrs[0], PROMPT, "--max-tokens", "5", cache=tmp_path)
        assert out["steps"] == 5 and len(out["members"]) == 2


@pytest.mark.timeout(120)
def test_peers_json_lists_every_node_with_leader_of(tiny_ggufs_shared, tmp_path):
    with mesh(tiny_ggufs_shared[:2], tmp_path) as (addrs, _procs):
        nodes = peers_of(addrs[1])
    assert sorted(n["name"] for n in nodes) == ["node0", "node1"]
    for n in nodes:
        assert {"name", "model", "address", "leader_of"} <= set(n)
        assert n["address"].startswith("127.0.0.1:")


@pytest.mark.timeout(300)
def test_conversation_turns_reuse_the_kv_cache(tiny_ggufs_shared, tmp_path):
    from dwarfmesh.ui.client import MeshClient
    from dwarfmesh.wire.protocol import GenParams

    params = GenParams(mode="stream", max_tokens=12, weights="equal")
    turn1 = [{"role": "user", "content": "def quicksort(xs): " * 8}]

    async def talk(address):
        async with MeshClient(address) as c:
            first = await c.generate("", params, messages=turn1, conversation="conv-1")
            turn2 = [*turn1, {"role": "assistant", "content": first.text},
                     {"role": "user", "content": "The quick brown fox"}]
            second = await c.generate("", params, messages=turn2, conversation="conv-1")
            fresh = await c.generate("", params, messages=turn2)     # no conversation id
            return first.summary, second.summary, fresh.summary

    with mesh(tiny_ggufs_shared[:2], tmp_path) as (addrs, _procs):
        first, second, fresh = asyncio.run(talk(addrs[0]))
    assert first["prompt_tokens_reused"] == 0
    # the second turn re-uses (at least) the whole first prompt from the cache
    assert second["prompt_tokens_reused"] >= first["prompt_tokens"]
    assert fresh["prompt_tokens_reused"] == 0
    assert second["prompt_tokens"] == fresh["prompt_tokens"]
    assert second["token_ids"][:4] == fresh["token_ids"][:4]


@pytest.mark.timeout(180)
def test_a_prompt_longer_than_the_context_is_a_clear_error(tmp_path):
    import subprocess
    import sys

    from meshutil import ROOT, node_env
    from tiny import make_tiny_gguf

    model = tmp_path / "short.gguf"
    make_tiny_gguf(model, "llama", seed=4, context=32)
    with mesh([model, model], tmp_path) as (addrs, _procs):
        out = subprocess.run([sys.executable, "-m", "dwarfmesh", "generate", "--connect", addrs[0],
                              "--prompt", "The quick brown fox " * 20], capture_output=True,
                             text=True, timeout=120, env=node_env(tmp_path), cwd=ROOT)
        assert out.returncode == 2
        assert "prompt too long" in out.stderr and "Traceback" not in out.stderr
        ok = generate_cli(addrs[1], "def f", "--max-tokens", "4", cache=tmp_path)
        assert ok["steps"] == 4                    # and the mesh goes on serving


@pytest.mark.timeout(180)
@pytest.mark.parametrize("engine", ["auto", "mlx"])
def test_nodes_that_served_an_answer_stop_cleanly_on_sigterm(tiny_ggufs_shared, tmp_path,
                                                            engine):
    """SIGTERM (what Ctrl-C on a service manager sends) after real work: every node logs
    that it stops and exits 0, on the default engine and on mlx. (Tearing mlx's model
    thread down with the interpreter used to abort now and then: "terminate called
    without an active exception", exit 134.)"""
    for attempt in range(3):
        work = tmp_path / f"run{attempt}"
        work.mkdir()
        with mesh(tiny_ggufs_shared, work, extra=["--engine", engine]) as (addrs, procs):
            out = generate_cli(addrs[1], "def quicksort(xs):", "--max-tokens", "8", cache=work)
            assert out["steps"] == 8
            stop(procs)
            codes = [p.returncode for p in procs]
        logs = [(work / f"node{i}.log").read_text() for i in range(len(procs))]
        assert codes == [0] * len(procs), [log[-300:] for log in logs]
        assert all("stopping node" in log and "terminate called" not in log for log in logs)
