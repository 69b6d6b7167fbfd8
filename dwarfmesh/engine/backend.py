"""The contract between the engine's worker thread and the library that runs the model.

A backend loads one model and computes log-probabilities over KV caches it hands out; the
worker (`engine.worker`) owns the session table, eviction, the thread and every decision
built on those numbers (prefill, step, top-k, text sessions, proposals). A backend knows
nothing about sessions, the network or fusion. Every method runs on the worker's thread.

Numbers cross the contract as numpy float32, so both backends feed the same top-k, the
same exact log p and the same text-session arithmetic.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Loaded:
    """What a backend reports once its model is loaded."""

    tokenizer: Any               # mlx-lm TokenizerWrapper, or engine.tokenizer.GGUFTokenizer
    vocab_size: int              # width of the logits
    context_length: int | None   # positions one session may hold
    detail: str = ""             # one line for the log (threads, quantization, ...)


class Backend(Protocol):
    """One model, many KV caches: forward, trim, score."""

    name: str                    # "mlx" | "llamacpp": shown by `dwarfmesh peers`

    def load(self) -> Loaded: ...

    def new_cache(self) -> Any:
        """An empty KV cache (raises EngineBusy-like RuntimeError when none is left)."""

    def free(self, cache: Any) -> None:
        """Give a cache's memory back."""

    def trimmable(self, cache: Any) -> bool:
        """Whether `trim` can drop any number of positions from this cache."""

    def trim(self, cache: Any, n: int) -> None:
        """Drop the last n positions, or raise ValueError (never compute on a stale one)."""

    def forward(self, cache: Any, ids: list[int],
                targets: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Append `ids` in one forward. Returns the next token's log-probs [V] after the
        last id, and log p(targets[i] | ids up to i) for each target (len <= len(ids))."""

    def forward_all(self, cache: Any, ids: list[int]) -> np.ndarray:
        """Append `ids` (a few: a speculative round) in one forward. Returns the log-probs
        [len(ids), V] of the next token after each id."""

    def score(self, cache: Any, held: int, keep: int,
              rows: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Evaluate each row as a continuation of the first `keep` of the cache's `held`
        positions, leaving the cache as it was. Per row: log p of row[1:] (each given the
        ids before it) and the log-probs [V] after the row's last id."""

    def release(self) -> None:
        """No session holds a cache any more: return pooled memory to the system."""

    # optional: close() frees the model once the engine has stopped


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the vocabulary (token -> id) and special tokens: equal means fusable by id."""
    vocab = tokenizer.get_vocab()
    items = sorted(vocab.items(), key=lambda kv: kv[1])
    h = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode())
    h.update(repr(sorted(getattr(tokenizer, "all_special_tokens", []) or [])).encode())
    return h.hexdigest()[:16]
