"""Tiny random-weight models of a real mlx-lm architecture, for tests.

`make_tiny_model(dir, seed)` writes an mlx-lm model directory (llama architecture; with
`window=`, gemma3_text's layout, five sliding-window layers then a global one, or with
`arch="llama"` llama's sliding-window layers; a few layers, random weights from `seed`)
with a real byte-level BPE tokenizer trained on a little text. Models made with the same
tokenizer text but different seeds share one vocabulary and differ in weights: an
ensemble of them is a real same-vocabulary mesh.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import gemma3_text, llama

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
