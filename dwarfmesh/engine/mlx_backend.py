"""The mlx backend: an mlx-lm model (a directory, a hub id, or a converted GGUF) and its
KV caches; the engine for Apple silicon (Metal) and NVIDIA (`mlx[cuda]`).

On the CPU the weights run in float32 (mlx's CPU fp16 and quantized matmuls are slow);
on a GPU they stay as stored. Owns mlx calls only: sessions, top-k and text logic are
the worker's (`engine.worker`, `engine.text`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm import load as mlx_load
from mlx_lm.models.cache import (
    KVCache,
    RotatingKVCache,
    can_trim_prompt_cache,
    make_prompt_cache,
    trim_prompt_cache,
)

from dwarfmesh.engine.backend import Loaded

# Architectures whose forward builds the sliding-window masks from the window size itself
# (mlx-lm's gemma3_text does), so a plain KV cache in their local layers gives the same
# logits as mlx-lm's rotating one, and unlike it can always be trimmed.
WINDOW_MASKED = frozenset({"gemma3_text"})


def _logprobs(logits: Any) -> Any:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


class MlxBackend:
    """One mlx-lm model; a cache is a list of mlx-lm layer caches."""

    name = "mlx"

    def __init__(self, model_path: str | Path) -> None:
        self.model_path = str(model_path)
        self.model: Any = None

    def load(self) -> Loaded:
        model, tokenizer, config = mlx_load(self.model_path, return_config=True)
        on_cpu = mx.default_device() == mx.cpu
        if on_cpu:
            # fp16/bf16 matmuls are very slow on the CPU backend; float32 is the fast path.
            model.set_dtype(mx.float32)
        mx.eval(model.parameters())
        self.model = model
        vocab = int(model(mx.array([[0]])).shape[-1])
        ctx = int(config.get("max_position_embeddings") or 0) or None
        return Loaded(tokenizer, vocab, ctx, "float32 on the CPU" if on_cpu else "on the GPU")

    def new_cache(self) -> list[Any]:
        """A prompt cache that can be trimmed back to any length.

        mlx-lm gives sliding-window layers a RotatingKVCache, which cannot be trimmed once
        it has wrapped (past the window, 512 tokens for gemma-3): a conversation's next
        turn, a text session's re-sync and a rank proposal all trim. For `WINDOW_MASKED`
        models those layers get a plain KVCache instead (the window is enforced by the
        mask; memory grows with the context like the global layers'). Other rotating
        caches are kept; the worker then starts such a session over or refuses it.
        """
        cache = make_prompt_cache(self.model)
        if getattr(self.model, "model_type", None) in WINDOW_MASKED:
            cache = [KVCache() if isinstance(c, RotatingKVCache) else c for c in cache]
        return cache

    def free(self, cache: Any) -> None:
        pass                    # mlx arrays go with the last reference to the cache

    def trimmable(self, cache: Any) -> bool:
        return can_trim_prompt_cache(cache)

    def trim(self, cache: Any, n: int) -> None:
        if n and trim_prompt_cache(cache, n) != n:
            raise ValueError("the KV cache cannot be trimmed (a sliding window that has "
                             "wrapped): this model cannot take part in sessions this long")

    def forward(self, cache: Any, ids: list[int],
                targets: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        logp = _logprobs(self.model(mx.array([ids], dtype=mx.int32), cache=cache)[0])
        got = mx.zeros((0,))
        if targets:
            t = mx.array(targets, dtype=mx.int32)
            got = mx.take_along_axis(logp[:t.size], t[:, None], axis=-1)[:, 0]
        last = logp[-1]
        mx.eval(got, last, [c.state for c in cache])
        return np.array(last), np.array(got, dtype=np.float32)

    def forward_all(self, cache: Any, ids: list[int]) -> np.ndarray:
        logp = _logprobs(self.model(mx.array([ids], dtype=mx.int32), cache=cache)[0])
        mx.eval(logp, [c.state for c in cache])
        return np.array(logp, dtype=np.float32)

    def score(self, cache: Any, held: int, keep: int,
              rows: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        # One batched forward over copies of the cache trimmed to `keep`, rows padded.
        width = max(len(r) for r in rows)
        try:
            caches = []
            for c in cache:
                c = copy.copy(c)
                c.trim(held - keep)
                caches.append(c.merge([c] * len(rows)))
        except AttributeError:
            raise ValueError("this model's KV cache cannot be batched") from None
        batch = mx.array([r + [0] * (width - len(r)) for r in rows], dtype=mx.int32)
        logp = _logprobs(self.model(batch, cache=caches))
        targets = mx.array([r[1:] + [0] * (width - len(r)) for r in rows], dtype=mx.int32)
        got = mx.take_along_axis(logp[:, :-1], targets[..., None], axis=-1)[..., 0]
        last = logp[mx.arange(len(rows)), mx.array([len(r) - 1 for r in rows])]
        mx.eval(got, last)
        got, last = np.array(got, dtype=np.float32), np.array(last)
        return [(got[i, :len(r) - 1], last[i]) for i, r in enumerate(rows)]

    def release(self) -> None:
        mx.clear_cache()
