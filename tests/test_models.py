"""Model resolution, pulling and GGUF import, checked by behaviour.

Fast tests build tiny GGUF files with `gguf.GGUFWriter` the way llama.cpp's converter
writes them (`tiny.make_tiny_gguf`: llama.cpp tensor names, q/k rows permuted, Q8_0
tensors), convert them and compare logits with an mlx-lm model built from the same
weights. Real-model tests check pulled models by output: token ids equal llama.cpp's
(tests/data/tokenizer_reference.json), greedy continuation, perplexity. They skip when
the model is not pulled (`dwarfmesh pull smollm2-135m`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm import generate, load
from mlx_lm.sample_utils import make_sampler
from reference import REFERENCE
from tiny import TOKENIZER_TEXT, make_tiny_gguf

from dwarfmesh.models import registry as models
from dwarfmesh.models.gguf_import import MARKER
from dwarfmesh.models.registry import ModelError, resolve_model


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DWARFMESH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_tiny_gguf_converts_to_same_logits_and_tokens(tmp_path, cache, arch):
    gguf_file = tmp_path / f"tiny-{arch}.gguf"
    reference, original_tok = make_tiny_gguf(gguf_file, arch)

    model_dir = resolve_model(str(gguf_file), progress=False)
    model, tok = load(str(model_dir))
    model.set_dtype(mx.float32)

    ids = original_tok.encode(TOKENIZER_TEXT[:300]).ids
    assert tok.encode(TOKENIZER_TEXT[:300], add_special_tokens=False) == ids
    assert tok.decode(ids) == TOKENIZER_TEXT[:300]
    x = mx.array(ids)[None]
    np.testing.assert_allclose(np.array(model(x)), np.array(reference(x)), atol=2e-4, rtol=1e-4)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["tie_word_embeddings"] is (arch != "qwen2")
    assert tok.eos_token_ids == {original_tok.token_to_id("<|endoftext|>")}
    assert "hi" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert models.model_id(model_dir) == f"tiny-{arch}"


@pytest.mark.timeout(60)
def test_gguf_conversion_happens_once_and_again_when_the_file_changes(tmp_path, cache):
    gguf_file = tmp_path / "tiny.gguf"
    make_tiny_gguf(gguf_file, "llama")
    first = resolve_model(str(gguf_file), progress=False)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_model(str(gguf_file), progress=False) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again

    os.utime(gguf_file, ns=(1, 1))  # a changed file gets a fresh conversion
    second = resolve_model(str(gguf_file), progress=False)
    assert second != first and (second / "config.json").is_file()
    assert sorted(p.name for p in (cache / "models").iterdir()) == sorted([first.name, second.name])


@pytest.mark.timeout(60)
def test_failed_conversion_leaves_no_directory_and_stale_temp_dirs_are_swept(tmp_path, cache):
    gguf_file = tmp_path / "bad-tokenizer.gguf"
    make_tiny_gguf(gguf_file, "llama", tokenizer_model="bert")
    models_dir = cache / "models"
    models_dir.mkdir(parents=True)
    dead = models_dir / ".bad-tokenizer-000000000000.tmp-999999999-deadbeef"  # no such pid
    dead.mkdir()
    with pytest.raises(ModelError, match="tokenizer"):
        resolve_model(str(gguf_file), progress=False)
    assert list(models_dir.iterdir()) == []


@pytest.mark.timeout(30)
def test_bad_specs_raise_one_line_model_errors(tmp_path, cache):
    cases = {
        "no-such-model": "known: smollm2-135m",
        str(tmp_path / "missing.gguf"): "no such .gguf file",
        str(tmp_path): "directory without config.json",
    }
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(os.urandom(4096))
    cases[str(garbage)] = "not a readable GGUF"
    for spec, expected in cases.items():
        with pytest.raises(ModelError, match=expected) as info:
            resolve_model(spec, progress=False)
        assert "\n" not in str(info.value)
    with pytest.raises(ModelError, match="run `dwarfmesh pull smollm2-135m`"):
        resolve_model("smollm2-135m", pull=False)
    with pytest.raises(ModelError, match="unknown model"):
        models.pull("no-such-model")
    assert resolve_model("mlx-community/SmolLM2-135M") == Path("mlx-community/SmolLM2-135M")


@pytest.mark.timeout(30)
def test_unsupported_architecture_is_a_model_error(tmp_path, cache):
    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(str(path), "falcon")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="'falcon' is not supported"):
        resolve_model(str(path), progress=False)


def write_wheel(wheelhouse: Path, dist: str, member: str, data: bytes) -> None:
    """A minimal valid wheel carrying one data file, as the weight packages do."""
    package = dist.replace("-", "_")
    info = f"{package}-0.1.dist-info"
    files = {
        f"{package}/__init__.py": b"",
        member: data,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheelhouse / f"{package}-0.1-py3-none-any.whl", "w") as z:
        for name, content in {**files, f"{info}/RECORD": record.encode()}.items():
            z.writestr(name, content)


@pytest.mark.timeout(120)
def test_pull_downloads_wheels_with_pip_verifies_and_converts(tmp_path, cache, monkeypatch):
    gguf_file = tmp_path / "tiny.gguf"
    make_tiny_gguf(gguf_file, "llama")
    data = gguf_file.read_bytes()
    half = len(data) // 2
    wheelhouse, site = tmp_path / "wheelhouse", tmp_path / "site"
    wheelhouse.mkdir()
    parts = []
    for i, chunk in enumerate((data[:half], data[half:]), start=1):
        dist, member = f"dwarfmesh-test-part{i}", f"dwarfmesh_test_part{i}/data/part{i:02d}.bin"
        if i == 1:  # already importable: read in place, not downloaded
            (site / member).parent.mkdir(parents=True)
            (site / member).write_bytes(chunk)
            (site / member).parent.parent.joinpath("__init__.py").write_text("")
        else:
            write_wheel(wheelhouse, dist, member, chunk)
        parts.append((f"{dist}==0.1", member))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv(models.WHEELHOUSE_ENV, str(wheelhouse))
    good = models.ModelSpec(
        "tiny-test", "test", tuple(parts), hashlib.sha256(data).hexdigest(), len(data), 0
    )
    bad = models.ModelSpec("tiny-bad", "test", tuple(parts), "0" * 64, len(data), 0)
    monkeypatch.setitem(models.SHORT_NAMES, "tiny-test", good)
    monkeypatch.setitem(models.SHORT_NAMES, "tiny-bad", bad)

    with pytest.raises(ModelError, match="sha256"):
        models.pull("tiny-bad", progress=False)
    assert not models.gguf_path_for("tiny-bad").exists()

    model_dir = resolve_model("tiny-test", progress=False)
    assert model_dir == models.converted_dir_for("tiny-test") and models.is_pulled("tiny-test")
    assert models.gguf_path_for("tiny-test").read_bytes() == data
    assert json.loads((model_dir / MARKER).read_text())["model_id"] == "tiny-test"
    assert load(str(model_dir))[0] is not None
    assert resolve_model("tiny-test", pull=False) == model_dir
    assert [p.name for p in cache.iterdir() if p.name.startswith(".pull-")] == []


# --- real models, checked by output --------------------------------------------------------

REAL_MODELS = {  # name: (perplexity bounds on the fixture's fortunes text, greedy must contain)
    # measured (llama.cpp on the same GGUF agrees within 1.5%): 23.6, 43.3, 26.0, 21.0
    "smollm2-135m": ((15.0, 32.0), ("return",)),
    "qwen2.5-coder-0.5b": ((30.0, 60.0), ("pivot", "return")),
    "qwen2.5-coder-1.5b": ((17.0, 36.0), ("pivot", "return")),
    "gemma-3-270m": ((14.0, 30.0), ("return",)),
}


@pytest.fixture(scope="module", params=list(REAL_MODELS))
def real_model(request):
    """One pulled model at a time (module scope: pytest groups the tests by model)."""
    name = request.param
    if not models.is_pulled(name):
        pytest.skip(f"{name} is not pulled (run `dwarfmesh pull {name}`)")
    path = models.converted_dir_for(name)
    model, tok = load(str(path))
    model.set_dtype(mx.float32)  # float16 matmuls are very slow on the CPU
    return name, path, model, tok


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_real_tokenizer_equals_llama_cpp(real_model):
    name, path, _, tok = real_model
    reference = REFERENCE["models"][name]
    assert reference["gguf_sha256"] == models.SHORT_NAMES[name].sha256
    for key, text in REFERENCE["texts"].items():
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == reference["ids"][key], f"{name} tokenizes '{key}' unlike llama.cpp"
        assert tok.decode(ids) == text
    chat = None
    if tok.has_chat_template:  # special tokens in a rendered chat are single ids
        messages = [{"role": "user", "content": "Sort 3, 1, 2 in Python."}]
        chat = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tok.eos_token_id in tok.encode(chat, add_special_tokens=False)
    try:
        from llama_cpp import Llama
    except ImportError:
        return  # the fixture holds llama.cpp's ids; a live comparison is a bonus
    live = Llama(model_path=str(models.gguf_path_for(name)), vocab_only=True, verbose=False)
    text = "".join(REFERENCE["texts"].values())[::-1]  # a text the fixture does not hold
    assert tok.encode(text, add_special_tokens=False) == live.tokenize(
        text.encode(), add_bos=False, special=False
    )
    if chat is not None:
        assert tok.encode(chat, add_special_tokens=False) == live.tokenize(
            chat.encode(), add_bos=False, special=True
        )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_greedy_continuation_is_code(real_model):
    name, _, model, tok = real_model
    _, expected = REAL_MODELS[name]
    out = generate(model, tok, "def quicksort(xs):", max_tokens=32, sampler=make_sampler(0.0))
    assert out.startswith("\n") and out.isascii(), out
    assert all(word in out for word in expected), out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_real_perplexity_on_fortunes_is_in_range(real_model):
    name, _, model, tok = real_model
    (low, high), _ = REAL_MODELS[name]
    ids = mx.array(tok.encode(REFERENCE["texts"]["fortunes"]))[None]  # BOS if the model wants it
    logits = model(ids[:, :-1]).astype(mx.float32)
    perplexity = math.exp(nn.losses.cross_entropy(logits, ids[:, 1:], reduction="mean").item())
    assert low < perplexity < high, f"{name}: perplexity {perplexity:.1f}"
