"""Convert one GGUF file into an mlx-lm model directory.

This module owns the GGUF -> mlx-lm translation: hyper-parameters into config.json,
tensors (any ggml quantization the `gguf` package dequantizes: Q4_0/Q4_1/Q5_x/Q8_0,
K-quants, F16/F32) into float16 `model.safetensors` under mlx-lm's names, undoing what
llama.cpp's converter did to them (the rotary row permutation of llama's q/k, Gemma's +1 on
RMSNorm weights), and the tokenizer (delegated to `gguf_tokenizer`). The output directory
is written atomically: a temp directory renamed into place, so a killed conversion never
leaves a half model behind.

It does not fetch anything, pick cache locations or decide when to convert (that is
`models`), and it does not quantize: the CPU engine runs float32, and Metal/CUDA users can
re-quantize the float16 weights with mlx-lm.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dwarfmesh.models.gguf_tokenizer import end_of_generation_ids, write_tokenizer

log = logging.getLogger(__name__)

# Bump when the output of a conversion changes; cached conversions of older formats are redone.
FORMAT_VERSION = 1
MARKER = "dwarfmesh_import.json"


class GGUFImportError(ValueError):
    """The GGUF file cannot be converted (unsupported architecture, missing metadata...)."""


@dataclass(frozen=True)
class Architecture:
    """How one GGUF `general.architecture` maps onto an mlx-lm model type."""

    model_type: str
    block_names: dict[str, str]
    permute_qk: bool = False  # llama.cpp permuted q/k rows for its interleaved rotary
    norm_offset: float = 0.0  # added to every *norm weight (Gemma stores 1 + w)
    extra_config: dict[str, Any] = field(default_factory=dict)


_ATTENTION_AND_MLP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_LLAMA_BLOCK = {**_ATTENTION_AND_MLP, "ffn_norm": "post_attention_layernorm"}
_GEMMA3_BLOCK = {
    **_ATTENTION_AND_MLP,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("llama", _LLAMA_BLOCK, permute_qk=True),
    "qwen2": Architecture("qwen2", _LLAMA_BLOCK),
    # llama.cpp hard-codes these for gemma3; they are not in the GGUF.
    "gemma3": Architecture(
        "gemma3_text",
        _GEMMA3_BLOCK,
        norm_offset=-1.0,
        extra_config={"sliding_window_pattern": 6, "rope_local_base_freq": 10000.0},
    ),
}
_TOP_LEVEL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def read_metadata(reader: Any) -> dict[str, Any]:
    """GGUF key/value metadata of a `gguf.GGUFReader` as plain Python values."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    progress: bool = True,
    extra_marker: dict[str, Any] | None = None,
) -> Path:
    """Convert `gguf_path` into the mlx-lm directory `out_dir` (replaced if it exists).

    Writes config.json, model.safetensors (float16), tokenizer.json, tokenizer_config.json
    and a MARKER json (format version, source file, `extra_marker`). Returns `out_dir`.
    Raises GGUFImportError for a file it cannot convert, OSError for I/O failures.
    """
    from gguf import GGUFReader

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    started = time.monotonic()
    try:
        reader = GGUFReader(gguf_path)
    except (ValueError, KeyError, IndexError) as e:  # the reader's errors on a corrupt file
        raise GGUFImportError(f"{gguf_path} is not a readable GGUF file ({e})") from e
    meta = read_metadata(reader)
    arch_name = meta.get("general.architecture")
    if arch_name not in ARCHITECTURES:
        raise GGUFImportError(
            f"GGUF architecture {arch_name!r} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    arch = ARCHITECTURES[arch_name]
    tensors = {t.name: t for t in reader.tensors}
    config = build_config(meta, arch, tensors)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for marker in (".tmp-", ".old-"):
        remove_stale_temp_dirs(out_dir.parent, marker)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        try:  # first: it is quick, and fails before the slow part when it fails
            write_tokenizer(meta, tmp)
        except (KeyError, ValueError) as e:
            raise GGUFImportError(f"cannot build the tokenizer of {gguf_path}: {e}") from e
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        weights = _convert_tensors(tensors, arch, config, progress=progress, label=gguf_path.name)
        _save_weights(weights, tmp / "model.safetensors")
        del weights
        stat = gguf_path.stat()
        marker = {
            "format": FORMAT_VERSION,
            "source": str(gguf_path.resolve()),
            "source_size": stat.st_size,
            "source_mtime": stat.st_mtime,
            "architecture": arch_name,
            "name": meta.get("general.name", gguf_path.stem),
            **(extra_marker or {}),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        _move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s -> %s in %.1f s", gguf_path, out_dir, time.monotonic() - started)
    return out_dir


def build_config(meta: dict[str, Any], arch: Architecture, tensors: dict[str, Any]) -> dict:
    """config.json for mlx-lm from GGUF hyper-parameters."""
    prefix = meta["general.architecture"]

    def get(key: str, default: Any = KeyError) -> Any:
        value = meta.get(f"{prefix}.{key}", default)
        if value is KeyError:
            raise GGUFImportError(f"GGUF metadata lacks {prefix}.{key}")
        if isinstance(value, list):
            raise GGUFImportError(f"per-layer {prefix}.{key} is not supported")
        return value

    n_heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // n_heads))
    if "token_embd.weight" not in tensors:
        raise GGUFImportError("GGUF has no token_embd.weight tensor")
    config: dict[str, Any] = {
        "model_type": arch.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(f"{get('attention.layer_norm_rms_epsilon'):.6g}"),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "max_position_embeddings": int(get("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensors,
        **arch.extra_config,
    }
    if prefix == "gemma3":
        config["query_pre_attn_scalar"] = head_dim
        config["sliding_window"] = int(get("attention.sliding_window", 512))
    if (scaling := meta.get(f"{prefix}.rope.scaling.type")) not in (None, "none"):
        config["rope_scaling"] = {
            "type": scaling,
            "rope_type": scaling,
            "factor": float(get("rope.scaling.factor")),
            "original_max_position_embeddings": int(
                get("rope.scaling.original_context_length", config["max_position_embeddings"])
            ),
        }
    if "tokenizer.ggml.bos_token_id" in meta:
        config["bos_token_id"] = int(meta["tokenizer.ggml.bos_token_id"])
    if "tokenizer.ggml.tokens" in meta:
        config["eos_token_id"] = end_of_generation_ids(meta)
    return config


def mlx_name(gguf_name: str, arch: Architecture) -> str | None:
    """mlx-lm parameter name for a GGUF tensor name, or None for tensors mlx-lm has no use for."""
    if gguf_name in _TOP_LEVEL_NAMES:
        return _TOP_LEVEL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in arch.block_names:
        return f"model.layers.{parts[1]}.{arch.block_names[parts[2]]}.{parts[3]}"
    return None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's `permute` of q/k rows (interleaved -> half-split rotary layout)."""
    return (
        w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def dequantized(tensor: Any) -> np.ndarray:
    """A GGUF tensor as float32 numpy in row-major (out, in) layout."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape))
    if tensor.tensor_type in (
        GGMLQuantizationType.F32,
        GGMLQuantizationType.F16,
        GGMLQuantizationType.BF16,
    ):
        data = np.asarray(tensor.data)
        if tensor.tensor_type == GGMLQuantizationType.BF16:  # stored as raw uint16 words
            data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return data.astype(np.float32).reshape(shape)
    try:
        return dequantize(tensor.data, tensor.tensor_type).reshape(shape)
    except NotImplementedError as e:
        raise GGUFImportError(
            f"tensor {tensor.name}: quantization {tensor.tensor_type.name} cannot be dequantized"
        ) from e


def _convert_tensors(
    tensors: dict[str, Any], arch: Architecture, config: dict, *, progress: bool, label: str
) -> dict[str, Any]:
    import mlx.core as mx

    weights: dict[str, Any] = {}
    total = sum(int(t.n_bytes) for t in tensors.values())
    with progress_bar(progress) as bar:
        task = bar.add_task(f"convert {label}", total=total) if bar else None
        for name, tensor in tensors.items():
            target = mlx_name(name, arch)
            if target is None:
                log.debug("skipping GGUF tensor %s (no mlx-lm counterpart)", name)
            else:
                w = dequantized(tensor)
                if arch.permute_qk and ".attn_q." in name:
                    w = unpermute_rows(w, config["num_attention_heads"])
                elif arch.permute_qk and ".attn_k." in name:
                    w = unpermute_rows(w, config["num_key_value_heads"])
                if arch.norm_offset and name.endswith("norm.weight"):
                    w = w + arch.norm_offset
                w16 = w.astype(np.float16)
                if not np.isfinite(w16).all():
                    raise GGUFImportError(f"tensor {name} overflows float16")
                weights[target] = mx.array(w16)
            if bar:
                bar.update(task, advance=int(tensor.n_bytes))
    missing = {"model.embed_tokens.weight", "model.norm.weight"} - weights.keys()
    if missing:
        raise GGUFImportError(f"GGUF lacks tensors for {', '.join(sorted(missing))}")
    return weights


def _save_weights(weights: dict[str, Any], path: Path) -> None:
    import mlx.core as mx

    mx.save_safetensors(str(path), weights, metadata={"format": "mlx"})


def progress_bar(enabled: bool) -> Any:
    """A rich Progress on stderr (a context manager), or a null context yielding None."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`; an existing `out_dir` is moved aside first, then removed."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temp_dirs(parent: Path, marker: str) -> None:
    """Remove `parent/*<marker><pid>-*` left behind by processes that are no longer running."""
    for path in parent.glob(f"*{marker}*"):
        pid_text = path.name.split(marker, 1)[1].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            log.info("removing %s, left by an interrupted run", path)
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
