"""Model resolution, pulling and GGUF import, checked by behaviour.

Fast tests build tiny GGUF files with `gguf.GGUFWriter` the way llama.cpp's converter
writes them (llama.cpp tensor names, q/k rows permuted, Q8_0 tensors), convert them and
compare logits with an mlx-lm model built from the same weights. Real-model tests check
pulled models by output: token ids equal llama.cpp's (tests/data/tokenizer_reference.json),
greedy continuation, perplexity. They skip when the model is not pulled
(`dwarfmesh pull smollm2-135m`).
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
from mlx.utils import tree_flatten
from mlx_lm import generate, load
from mlx_lm.models import gemma3_text, llama, qwen2
from mlx_lm.sample_utils import make_sampler
from tiny import TOKENIZER_TEXT, make_tokenizer
from tokenizers import Tokenizer

from dwarfmesh import models
from dwarfmesh.gguf_import import MARKER
from dwarfmesh.models import ModelError, resolve_model

REFERENCE = json.loads((Path(__file__).parent / "data" / "tokenizer_reference.json").read_text())
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = "{% for m in messages %}<|endoftext|>{{ m['content'] }}{% endfor %}"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DWARFMESH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- tiny GGUF files written the way llama.cpp writes them -------------------------------


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute (HF -> GGUF row order)."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


HF_TO_GGUF = {  # written out independently of gguf_import's table
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GEMMA3_TO_GGUF = {
    **HF_TO_GGUF,
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}


def gguf_name(hf: str, arch: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in top:
        return top[hf]
    _, _, layer, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    table = GEMMA3_TO_GGUF if arch == "gemma3" else HF_TO_GGUF
    return f"blk.{layer}.{table[module]}.{kind}"


def make_tiny_gguf(path: Path, arch: str, *, seed: int = 0, tokenizer_model: str = "gpt2"):
    """Write a tiny GGUF; return (reference mlx-lm model with the weights as stored, tokenizer)."""
    tok_dir = path.parent / f"{path.stem}-tok"
    tok_dir.mkdir(parents=True)
    make_tokenizer(tok_dir)
    tok = json.loads((tok_dir / "tokenizer.json").read_text())
    if arch == "qwen2":  # a Qwen tokenizer: transformers rebuilds this pipeline for qwen2 anyway
        tok["normalizer"] = {"type": "NFC"}
        tok["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_REGEX},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {
                    "type": "ByteLevel",
                    "add_prefix_space": False,
                    "trim_offsets": False,
                    "use_regex": False,
                },
            ],
        }
        (tok_dir / "tokenizer.json").write_text(json.dumps(tok))
    vocab = tok["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    layers = 6 if arch == "gemma3" else 2  # gemma3: 5 local layers, then a global one
    rope_theta = 1e6 if arch == "gemma3" else 10000.0
    config = {
        "model_type": arch,
        "hidden_size": 64,
        "num_hidden_layers": layers,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(tokens),
        "rope_theta": rope_theta,
        "max_position_embeddings": 256,
        "tie_word_embeddings": arch != "qwen2",
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
    }
    module = {"llama": llama, "qwen2": qwen2, "gemma3": gemma3_text}[arch]
    reference = module.Model(module.ModelArgs.from_dict(config))
    rng = np.random.default_rng(seed)
    weights = {}
    for name, p in tree_flatten(reference.parameters()):
        w = rng.normal(0, 0.1 if p.ndim > 1 else 0.5, p.shape).astype(np.float32)
        if "norm" in name:
            w = 1.0 + w
        weights[name] = w.astype(np.float16).astype(np.float32)  # exact in the float16 output
    if config["tie_word_embeddings"]:
        weights.pop("lm_head.weight", None)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(rope_theta)
    if arch == "gemma3":  # the local layers' 10000 is not in the file: llama.cpp fixes it too
        writer.add_key_length(16)
        writer.add_value_length(16)
        writer.add_sliding_window(512)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("qwen2" if arch == "qwen2" else "default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    writer.add_token_merges(
        [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    )
    writer.add_eos_token_id(vocab["<|endoftext|>"])
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, w in weights.items():
        if arch == "llama" and ".q_proj." in name:
            w = llama_cpp_permute(w, 4)
        elif arch == "llama" and ".k_proj." in name:
            w = llama_cpp_permute(w, 2)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            w = w + 1.0  # llama.cpp's converter folds Gemma's (1 + w) into the weight
        if "mlp" in name:  # quantized, like a real file; the reference gets the rounded values
            q = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name(name, arch), q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            weights[name] = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name(name, arch), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # The import stores float16: give the reference exactly those values.
    stored = {k: mx.array(v.astype(np.float16).astype(np.float32)) for k, v in weights.items()}
    reference.load_weights(list(reference.sanitize(stored).items()))
    return reference, Tokenizer.from_file(str(tok_dir / "tokenizer.json"))


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
