"""Build a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) from GGUF metadata.

This module owns the translation of a GGUF file's `tokenizer.*` keys into files that
`transformers.AutoTokenizer` (and so `mlx_lm.load`) reads: a byte-level BPE tokenizer for
`tokenizer.ggml.model == "gpt2"` (Qwen, SmolLM, Llama 3, ...) and a SentencePiece-style BPE
with byte fallback for `"llama"` (Gemma, Llama 2, Mistral). The pre-tokenizer is chosen
from `tokenizer.ggml.pre` so that ids equal llama.cpp's own tokenization of the same GGUF.

It does not read tensors or write weights (that is `gguf_import`), and it does not use
transformers' GGUF tokenizer builder, which mis-splits SmolLM's digits and newlines.
Tokenizers are verified by comparing ids with llama.cpp (`tests/data/tokenizer_reference.json`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# GGUF token types (gguf.TokenType).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Control tokens that end a generation. llama.cpp marks these end-of-generation by their
# text too, whatever the GGUF's eos id says (e.g. Qwen's eos is <|im_end|>, yet a base
# completion ends with <|endoftext|>).
END_OF_GENERATION_TEXTS = frozenset(
    {
        "<|endoftext|>",
        "<|im_end|>",
        "<|eot_id|>",
        "<|eom_id|>",
        "<end_of_turn>",
        "<|end|>",
        "</s>",
        "<eos>",
        "<|end_of_text|>",
    }
)

_GPT2_BYTE_LEVEL = {
    "type": "ByteLevel",
    "add_prefix_space": False,
    "trim_offsets": True,
    "use_regex": True,
}
_BYTE_LEVEL_NO_REGEX = {**_GPT2_BYTE_LEVEL, "use_regex": False}


def _split(regex: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGITS_THEN_GPT2 = {
    "type": "Sequence",
    "pretokenizers": [{"type": "Digits", "individual_digits": True}, _GPT2_BYTE_LEVEL],
}

# tokenizer.ggml.pre -> (normalizer, pre_tokenizer) of the original HF tokenizer. The keys
# are llama.cpp's names; the regexes are the ones llama.cpp's llama-vocab.cpp applies.
BPE_PRE_TOKENIZERS: dict[str, tuple[dict[str, Any] | None, dict[str, Any]]] = {
    "default": (None, _GPT2_BYTE_LEVEL),
    "gpt-2": (None, _GPT2_BYTE_LEVEL),
    "smollm": (None, _DIGITS_THEN_GPT2),
    "starcoder": (None, _DIGITS_THEN_GPT2),
    "refact": (None, _DIGITS_THEN_GPT2),
    "codeshell": (None, _DIGITS_THEN_GPT2),
    "qwen2": (
        {"type": "NFC"},
        {"type": "Sequence", "pretokenizers": [_split(_QWEN2_REGEX), _BYTE_LEVEL_NO_REGEX]},
    ),
    "llama-bpe": (
        None,
        {"type": "Sequence", "pretokenizers": [_split(_LLAMA3_REGEX), _BYTE_LEVEL_NO_REGEX]},
    ),
}
# llama.cpp ignores merges for a word that is already one token with these pre-tokenizers.
_IGNORE_MERGES = frozenset({"llama-bpe"})


def build_tokenizer(meta: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (tokenizer.json, tokenizer_config.json) contents for GGUF metadata `meta`.

    `meta` maps GGUF keys to plain Python values (lists of str/int for arrays).
    Raises ValueError for a tokenizer model this module cannot build.
    """
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if kind == "gpt2":
        tokenizer = _byte_level_bpe(meta, tokens, types)
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(meta, tokens, types)
    else:
        raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")
    tokenizer["added_tokens"] = _added_tokens(tokens, types)
    bos = _special(meta, tokens, "bos")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    bos_id = int(meta.get("tokenizer.ggml.bos_token_id", -1))
    tokenizer["post_processor"] = _bos_template(bos, bos_id) if add_bos else None
    config: dict[str, Any] = {
        # transformers 5 loads this as TokenizersBackend (tokenizer.json as is), except for
        # model types it overrides: qwen2 gets Qwen2Tokenizer, whose hard-coded pipeline is
        # the "qwen2" entry of BPE_PRE_TOKENIZERS (checked against llama.cpp by the tests).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": _special(meta, tokens, "eos"),
        "unk_token": _special(meta, tokens, "unknown"),
        "pad_token": _special(meta, tokens, "padding"),
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(meta.get(f"{meta['general.architecture']}.context_length", 4096)),
    }
    if template := meta.get("tokenizer.chat_template"):
        config["chat_template"] = template
    return tokenizer, config


def end_of_generation_ids(meta: Mapping[str, Any]) -> list[int]:
    """Token ids that end a generation: eos (and eot/eom) ids, plus known end-of-turn texts."""
    ids = [
        int(meta[f"tokenizer.ggml.{k}_token_id"])
        for k in ("eos", "eot", "eom")
        if f"tokenizer.ggml.{k}_token_id" in meta
    ]
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or []
    ids += [i for i, t in enumerate(types) if t == CONTROL and tokens[i] in END_OF_GENERATION_TEXTS]
    return sorted(set(ids))


def write_tokenizer(meta: Mapping[str, Any], out_dir: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json for GGUF metadata into `out_dir`."""
    tokenizer, config = build_tokenizer(meta)
    (out_dir / "tokenizer.json").write_text(
        json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8"
    )
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8"
    )


def _byte_level_bpe(meta: Mapping[str, Any], tokens: list[str], types: list[int]) -> dict[str, Any]:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in BPE_PRE_TOKENIZERS:
        log.warning(
            "GGUF pre-tokenizer %r is not known here; using GPT-2's. Check the token "
            "ids against llama.cpp before trusting this model.",
            pre,
        )
    normalizer, pre_tokenizer = BPE_PRE_TOKENIZERS.get(pre, BPE_PRE_TOKENIZERS["default"])
    merges = [m.split(" ", 1) for m in meta.get("tokenizer.ggml.merges", [])]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": pre in _IGNORE_MERGES,
            "vocab": _vocab(tokens),
            "merges": merges,
        },
    }


def _sentencepiece_bpe(
    meta: Mapping[str, Any], tokens: list[str], types: list[int]
) -> dict[str, Any]:
    """SentencePiece BPE as HF BPE: merges ranked by the score of the merged piece."""
    scores = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    vocab = _vocab(tokens)
    mergeable = {t: i for i, t in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED, UNUSED)}
    candidates = []
    for piece, piece_id in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                candidates.append(
                    (-scores[piece_id], mergeable[left], mergeable[right], left, right)
                )
    candidates.sort()
    prefix_space = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    prepend = {"type": "Prepend", "prepend": "▁"}
    normalizer = (
        {"type": "Sequence", "normalizers": [prepend, replace]} if prefix_space else replace
    )
    decoders = [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if prefix_space:
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "normalizer": normalizer,
        "pre_tokenizer": None,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": tokens[unk_id] if unk_id is not None else None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [[c[3], c[4]] for c in candidates],
        },
    }


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token in vocab:
            log.debug(
                "duplicate token %r at id %d (first at %d); keeping the first",
                token,
                i,
                vocab[token],
            )
            continue
        vocab[token] = i
    return vocab


def _added_tokens(tokens: list[str], types: list[int]) -> list[dict[str, Any]]:
    """Control/unknown tokens as special added tokens; user-defined ones as plain added tokens."""
    return [
        {
            "id": i,
            "content": tokens[i],
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": t in (CONTROL, UNKNOWN),
        }
        for i, t in enumerate(types)
        if t in (CONTROL, UNKNOWN, USER_DEFINED)
    ]


def _special(meta: Mapping[str, Any], tokens: list[str], kind: str) -> str | None:
    token_id = meta.get(f"tokenizer.ggml.{kind}_token_id")
    if token_id is None or not 0 <= int(token_id) < len(tokens):
        return None
    return tokens[int(token_id)]


def _bos_template(bos: str, bos_id: int) -> dict[str, Any]:
    bos_piece = {"SpecialToken": {"id": bos, "type_id": 0}}
    return {
        "type": "TemplateProcessing",
        "single": [bos_piece, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            bos_piece,
            {"Sequence": {"id": "A", "type_id": 0}},
            bos_piece,
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
