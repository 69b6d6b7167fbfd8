"""Tiny random-weight models of a real mlx-lm architecture, for tests.

`make_tiny_model(dir, seed)` writes an mlx-lm model directory (llama architecture; with
`window=`, gemma3_text's layout, five sliding-window layers then a global one, or with
`arch="llama"` llama's sliding-window layers; a few layers, random weights from `seed`)
with a real byte-level BPE tokenizer trained on a little text. Models made with the same
tokenizer text but different seeds share one vocabulary and differ in weights: an
ensemble of them is a real same-vocabulary mesh.

`make_tiny_gguf(path, arch)` writes a tiny GGUF file the way llama.cpp's converter writes
one (llama.cpp tensor names, q/k rows permuted, Q8_0 MLP tensors; llama, qwen2 or gemma3
layout, a tokenizer from `make_tokenizer`) and returns the mlx-lm reference model holding
the weights as stored, with the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models import gemma3_text, llama, qwen2
from tokenizers import Tokenizer

import dwarfmesh  # noqa: F401  (OpenBLAS preload before mlx)

TOKENIZER_TEXT = (
    "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n"
    "The quick brown fox jumps over the lazy dog. 0123456789\n"
    "Ensembles of language models fuse their next-token distributions.\n"
) * 20


def make_tokenizer(out: Path, vocab_size: int = 320) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TOKENIZER_TEXT], trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>", "bos_token": None, "model_max_length": 4096}))


def make_tiny_model(out: Path, seed: int, *, vocab_size: int = 320, layers: int = 2,
                    hidden: int = 64, window: int | None = None, arch: str = "gemma3_text"
                    ) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(out, vocab_size)
    config = {
        "model_type": "llama", "hidden_size": hidden, "num_hidden_layers": layers,
        "intermediate_size": hidden * 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "vocab_size": vocab_size, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "eos_token_id": 0,
    }
    module = llama
    if window is not None and arch == "llama":     # llama with sliding-window layers
        config.update(layer_types=["sliding_attention", "full_attention"] * max(layers // 2, 1),
                      sliding_window=window)
        config["num_hidden_layers"] = len(config["layer_types"])
    elif window is not None:     # gemma-3's layout: local (sliding-window) layers, then global
        module = gemma3_text
        config.update(model_type="gemma3_text", num_hidden_layers=max(layers, 6),
                      head_dim=hidden // 4, query_pre_attn_scalar=hidden // 4,
                      sliding_window=window, sliding_window_pattern=6,
                      max_position_embeddings=4096)
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(config))
    # Scale the output layer up so distributions are peaked like a trained model's,
    # not near-uniform (which would make every greedy choice a coin toss).
    model.lm_head.weight = model.lm_head.weight * 8.0
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    (out / "config.json").write_text(json.dumps(config))
    return out


# --- tiny GGUF files written the way llama.cpp writes them -------------------------------

QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHAT_TEMPLATE = "{% for m in messages %}<|endoftext|>{{ m['content'] }}{% endfor %}"


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


def make_tiny_gguf(path: Path, arch: str, *, seed: int = 0, tokenizer_model: str = "gpt2",
                   hidden: int = 64, layers: int | None = None, context: int = 256,
                   vocab_size: int = 320, quantize: bool = True, output_scale: float = 1.0):
    """Write a tiny GGUF; return (reference mlx-lm model with the weights as stored, tokenizer).
    Heads of 16 wide at the default `hidden` (4 heads, 2 for keys and values); a wider
    model gets 64-wide heads. `quantize=False` keeps the MLP in float32 (one engine's
    batchings then agree to float rounding, not Q8_0's); `output_scale` > 1 gives the
    model its own output layer, scaled up so distributions are peaked like a trained
    model's (greedy choices are then far from ties)."""
    tok_dir = path.parent / f"{path.stem}-tok"
    tok_dir.mkdir(parents=True)
    make_tokenizer(tok_dir, vocab_size)
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
    if layers is None:
        layers = 6 if arch == "gemma3" else 2  # gemma3: 5 local layers, then a global one
    rope_theta = 1e6 if arch == "gemma3" else 10000.0
    head_dim = 16 if hidden <= 64 else 64
    heads = hidden // head_dim
    kv_heads = max(1, heads // 2)
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(tokens),
        "rope_theta": rope_theta,
        "max_position_embeddings": context,
        "tie_word_embeddings": arch != "qwen2" and output_scale == 1.0,
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
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
    elif output_scale != 1.0:
        w = weights["lm_head.weight"] * output_scale
        weights["lm_head.weight"] = w.astype(np.float16).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(context)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(2 * hidden)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(rope_theta)
    if arch == "gemma3":  # the local layers' 10000 is not in the file: llama.cpp fixes it too
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
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
            w = llama_cpp_permute(w, heads)
        elif arch == "llama" and ".k_proj." in name:
            w = llama_cpp_permute(w, kv_heads)
        elif arch == "gemma3" and name.endswith("norm.weight"):
            w = w + 1.0  # llama.cpp's converter folds Gemma's (1 + w) into the weight
        if "mlp" in name and quantize:  # like a real file; the reference gets the rounded values
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
