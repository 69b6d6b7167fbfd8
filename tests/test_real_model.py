"""The real bundled model (SmolLM2-135M, converted from its registry GGUF) through the mesh.

`scripts/test` pulls it first; the test skips, saying so, only when it was not pulled.
"""

import pytest

import dwarfmesh  # noqa: F401
import mlx.core as mx
from dwarfmesh.models import ModelError, resolve_model
from meshutil import generate_cli, mesh, peers_of
from mlx_lm import load, stream_generate

PROMPT = "def quicksort(xs):"


@pytest.fixture(scope="module")
def smollm2():
    try:
        return resolve_model("smollm2-135m", pull=False, progress=False)
    except ModelError as exc:
        pytest.skip(f"smollm2-135m is not pulled (run scripts/setup smollm2-135m): {exc}")


@pytest.mark.timeout(600)
def test_smollm2_two_nodes_reproduce_its_greedy_output(smollm2, tmp_path):
    model, tok = load(str(smollm2))
    model.set_dtype(mx.float32)
    own = [r.token for r in stream_generate(model, tok, PROMPT, max_tokens=24)]
    with mesh(["smollm2-135m", "smollm2-135m"], tmp_path) as (addrs, _procs):
        nodes = peers_of(addrs[0])
        out = generate_cli(addrs[1], PROMPT, "--max-tokens", "24", cache=tmp_path)
    assert {n["model"] for n in nodes} == {"smollm2-135m"}
    assert out["token_ids"] == own[: len(out["token_ids"])]
    assert len(out["token_ids"]) >= 8
    assert out["text"].strip(), out
    assert out["disagreement_rate"] == 0.0
    assert out["frame_bytes_per_member_per_token"] <= 512
