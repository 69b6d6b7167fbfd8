"""The llama.cpp engine on the real registry models: the tokenizer, agreement with mlx, a
sliding window past its size, and SmolLM2-135M end to end on both engines.

A test skips, saying so, when its model is not pulled or llama-cpp-python is not
installed (`scripts/setup smollm2-135m gemma-3-270m` does both on CPU-only Linux).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from meshutil import free_port, generate_cli, peers_of, start_node, stop, wait_for_mesh
from reference import REFERENCE, assert_same_tokenizer

from dwarfmesh.engine.choose import make_engine
from dwarfmesh.models import registry as models

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/setup)")

PROMPT = "def quicksort(xs):"


def pulled(name: str) -> None:
    if not models.is_pulled(name):
        pytest.skip(f"{name} is not pulled (run `dwarfmesh pull {name}`)")


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of two log-probability vectors, nats."""
    return float(np.sum(np.exp(p.astype(np.float64)) * (p - q)))


def engine(name: str, kind: str):
    e = make_engine(name, kind, pull=False)[0]
    e.load_sync()
    return e


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", list(models.SHORT_NAMES))
def test_the_ggufs_own_tokenizer_fuses_by_id_with_the_mlx_import(name):
    pulled(name)
    from llama_cpp import Llama
    from mlx_lm.utils import load_tokenizer

    from dwarfmesh.engine.tokenizer import GGUFTokenizer

    lcp = make_engine(name, "llamacpp", pull=False)[0]
    tok_dir, eos = lcp.backend.tokenizer_dir, lcp.backend.eos_ids
    converted = models.converted_dir_for(name)     # what the mlx engine loads (no weights)
    config = json.loads((converted / "config.json").read_text())
    mlx_tok = load_tokenizer(converted, eos_token_ids=config["eos_token_id"])
    ours = GGUFTokenizer(tok_dir, eos)             # what the llama.cpp engine loads
    texts = list(REFERENCE["texts"].values()) + ["<|endoftext|> hi <bos>x", "  two", "a ,b"]
    assert_same_tokenizer(ours, mlx_tok, texts)
    live = Llama(model_path=str(models.gguf_path_for(name)), vocab_only=True, verbose=False)
    text = "".join(REFERENCE["texts"].values())
    assert ours.encode(text, add_special_tokens=False) == live.tokenize(
        text.encode(), add_bos=False, special=False)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smollm2_frames_agree_on_both_engines_over_200_greedy_tokens():
    pulled("smollm2-135m")
    mlx, lcp = engine("smollm2-135m", "mlx"), engine("smollm2-135m", "llamacpp")
    try:
        ids = mlx.encode(PROMPT)
        a, b = mlx.open_sync("s", ids, 64), lcp.open_sync("s", ids, 64)
        same = steps = 0
        for _ in range(200):
            steps += 1
            same += int(a.ids[0] == b.ids[0])
            if int(a.ids[0]) in mlx.eos_ids:
                break
            a, b = mlx.step_sync("s", int(a.ids[0]), 64), lcp.step_sync("s", int(a.ids[0]), 64)
        assert steps >= 100
        assert same / steps >= 0.95, f"top-1 equal on {same} of {steps} steps"
    finally:
        mlx.shutdown()
        lcp.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gemma3_sliding_window_trims_back_past_its_window_on_llamacpp():
    pulled("gemma-3-270m")
    lcp = engine("gemma-3-270m", "llamacpp")
    try:
        text = " ".join(REFERENCE["texts"].values()) * 6
        ids = lcp.encode(text)[:700]                     # past the 512-token window
        assert len(ids) == 700
        lcp.open_sync("c", ids, 16)
        lcp.close_sync("c", keep=True)
        old = lcp._sessions["c"].logprobs
        turn = ids[:600] + ids[100:160]                  # the next turn diverges at 600
        assert lcp.open_sync("c", turn, 16).reused == 600
        lcp.open_sync("f", turn, 16)
        fresh, trimmed = lcp._sessions["f"].logprobs, lcp._sessions["c"].logprobs
        # Batched kernels round differently (a few tenths of a nat in the far tail, KL
        # 1e-4 measured, the same as appending without any trim); a window that kept
        # stale entries would predict from another context (KL of whole nats).
        assert kl(fresh, trimmed) < 1e-3
        assert int(fresh.argmax()) == int(trimmed.argmax())
        assert kl(fresh, old) > 0.1
    finally:
        lcp.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smollm2_end_to_end_on_each_engine(tmp_path):
    pulled("smollm2-135m")
    expected = {}
    for kind in ("mlx", "llamacpp"):
        e = engine("smollm2-135m", kind)
        out = e.open_sync("g", e.encode(PROMPT), 1)
        toks = []
        for _ in range(24):
            toks.append(int(out.ids[0]))
            out = e.step_sync("g", toks[-1], 1)
        expected[kind] = toks
        e.shutdown()
    for kind in ("mlx", "llamacpp"):
        port = free_port()
        proc = start_node("smollm2-135m", kind, port, tmp_path, extra=["--engine", kind])
        try:
            addr = f"127.0.0.1:{port}"
            wait_for_mesh(addr, 1, deadline_s=300, procs=[proc])
            assert [p["engine"] for p in peers_of(addr)] == [kind]
            got = generate_cli(addr, PROMPT, "--max-tokens", "24", cache=tmp_path)
            assert got["token_ids"] == expected[kind]
            assert "return" in got["text"]
        finally:
            stop([proc])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_without_repacked_weights_a_drafted_forward_is_one_token_at_a_time_bit_for_bit():
    """gemma-3-270m's quantized GGUF, loaded as `node --no-repack` does: the log-probs a
    speculative round gets for several positions in one forward are exactly those of
    committing the tokens one at a time (with repacked weights they were up to 0.9 nats
    apart here, which is why that flag exists)."""
    pulled("gemma-3-270m")
    e = make_engine("gemma-3-270m", "llamacpp", pull=False, repack=False)[0]
    e.load_sync()
    try:
        prompt = e.encode("The capital of France is")
        k = 32
        e.open_sync("one", prompt, k)
        toks = [590, 6039, 236764, 532, 236743]
        one = [e.step_sync("one", t, k) for t in toks]
        e.open_sync("all", prompt, k)
        out = e.step_sync("all", toks[:1], k, toks[1:])
        assert list(out.ids) == list(one[0].ids)
        assert np.array_equal(out.logprobs, one[0].logprobs)
        for i, (ids, lps, rest) in enumerate(out.more):
            assert list(ids) == list(one[i + 1].ids)
            assert np.array_equal(lps, one[i + 1].logprobs) and rest == one[i + 1].rest_mass
            assert out.draft_logp[i] == one[i + 1].prev_logp
    finally:
        e.shutdown(wait=True)
