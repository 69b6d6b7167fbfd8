"""Real bundled models (converted from their registry GGUFs) through the mesh: SmolLM2-135M
alone, and SmolLM2-135M with gemma-3-270m (another tokenizer, sliding-window attention).

`scripts/test` pulls both first; a test skips, saying so, only when its model was not pulled.
"""

from pathlib import Path

import mlx.core as mx
import pytest
from meshutil import generate_cli, mesh, peers_of
from mlx_lm import load, stream_generate

import dwarfmesh  # noqa: F401
from dwarfmesh.models.registry import ModelError, resolve_model
from dwarfmesh.sessions.text_leader import RANK_CHUNK_TOKENS

PROMPT = "def quicksort(xs):"
# These compare the nodes with mlx-lm itself (test_llamacpp_real has the llama.cpp side)
MLX = ["--engine", "mlx"]


def pulled(name: str):
    try:
        return resolve_model(name, pull=False, progress=False)
    except ModelError as exc:
        pytest.skip(f"{name} is not pulled (run scripts/setup {name}): {exc}")


# Real bundled models, two node processes each on mlx (float32): beside other work on
# two cores their nodes starve each other past the liveness window.
pytestmark = [pytest.mark.slow, pytest.mark.exclusive]


@pytest.fixture(scope="module")
def smollm2():
    return pulled("smollm2-135m")


@pytest.fixture(scope="module")
def gemma():
    return pulled("gemma-3-270m")


@pytest.mark.timeout(600)
def test_smollm2_two_nodes_reproduce_its_greedy_output(smollm2, tmp_path):
    model, tok = load(str(smollm2))
    model.set_dtype(mx.float32)
    own = [r.token for r in stream_generate(model, tok, PROMPT, max_tokens=24)]
    with mesh(["smollm2-135m", "smollm2-135m"], tmp_path, extra=MLX) as (addrs, _procs):
        nodes = peers_of(addrs[0])
        out = generate_cli(addrs[1], PROMPT, "--max-tokens", "24", cache=tmp_path)
    assert {n["model"] for n in nodes} == {"smollm2-135m"}
    assert out["token_ids"] == own[: len(out["token_ids"])]
    assert len(out["token_ids"]) >= 8
    assert out["text"].strip(), out
    assert out["disagreement_rate"] == 0.0
    assert out["frame_bytes_per_member_per_token"] <= 512


# Two rounds or more of RANK_CHUNK_TOKENS (12); each round's check is a fresh prefill of
# the whole text by both references (seconds each on the CPU).
MIXED_TOKENS = 16


@pytest.mark.timeout(900)
def test_real_mixed_pair_ranks_past_gemmas_sliding_window(smollm2, gemma, tmp_path):
    """Two real tokenizers in one session (rank mode), on a prompt longer than gemma-3's
    512-token window: every round, each member's proposal must be its greedy continuation
    of the committed text computed afresh (a new prefill of it, with mlx-lm's own cache),
    which holds only if gemma's cache was re-synced correctly past its window."""
    from reference import Direct

    text = Path("/usr/share/games/fortunes/fortunes")
    prompt = (text.read_text()[:2200] if text.exists() else
              " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog."
                       for i in range(80)))
    refs = {"smollm2-135m": Direct(smollm2), "gemma-3-270m": Direct(gemma)}
    for ref in refs.values():
        ref.model.set_dtype(mx.float32)       # as the engine runs it on the CPU
        ref.keep_prefix(prompt)               # every round's context starts with it
    assert len(refs["gemma-3-270m"].tok.encode(prompt)) > 512
    with mesh(["smollm2-135m", "gemma-3-270m"], tmp_path, extra=MLX) as (addrs, _procs):
        out = generate_cli(addrs[1], prompt, "--max-tokens", str(MIXED_TOKENS), cache=tmp_path,
                           timeout=600)
    assert out["mode"] == "rank"              # auto: two tokenizers -> ranking by text
    assert sorted(out["members"]) == ["node0", "node1"] and out["dropped"] == []
    assert out["text"].strip() and out["steps"] == len(out["trace"]) >= 2
    committed = ""
    for step in out["trace"]:
        for name, proposed in step["proposals"].items():
            ref = refs[out["models"][name]]
            budget = min(RANK_CHUNK_TOKENS, MIXED_TOKENS - len(
                ref.tok.encode(committed, add_special_tokens=False)))
            if budget <= 0:
                continue
            assert tuple(proposed) == ref.proposal(prompt + committed, budget,
                                                   cached=True), (name, step)
        committed += step["candidates"][step["chosen"]][0]
    assert out["text"].startswith(committed)
