"""What the engine keeps per session, and its sizing constants.

A `Session` is backend-neutral: the backend's KV-cache handle (`cache`), the ids whose
keys/values it holds, and the log-probabilities of the next token as a numpy array, so
the exact log p of whichever token the leader commits is known even outside the top-k.
Owns no model and no thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

PREFILL_STEP = 512          # prompt tokens per forward during prefill (bounds logits memory)
LOGP_FLOOR = -1e4           # exact log p reported for a token of probability 0
MAX_SESSIONS = 16           # KV caches one engine holds at once (idle ones are evicted first)
SESSION_IDLE_S = 900.0      # a kept conversation cache idle this long is freed
DECODE_CONTEXT = 8          # tokens of context when decoding a new piece (SentencePiece spaces)


@dataclass
class Session:
    cache: Any                   # the backend's KV-cache handle
    logprobs: np.ndarray | None  # float32 [V]: distribution of the next token
    tokens: list[int]            # ids whose keys/values are in the cache
    active: bool = True          # False: kept between turns, may be evicted
    last_used: float = 0.0
    # a speculative round's drafted ids, the last `draft` of `tokens` (not committed), and
    # the log-probs after the committed ids and after each drafted one
    draft: int = 0
    draft_logprobs: list[np.ndarray] = field(default_factory=list)
    # text-level sessions only: the text the ids encode, every id's exact log p
    text: str = ""
    templated: bool = False      # text is a rendered chat template: encode without specials
    token_logp: list[float] = field(default_factory=list)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def top_k(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """The k most likely ids (best first), their log-probs as float16, and the rest mass."""
    k = min(k, logprobs.shape[-1])
    idx = np.argpartition(logprobs, -k)[-k:]
    vals = logprobs[idx]
    order = np.argsort(-vals, kind="stable")
    ids, lps = idx[order].astype(np.uint32), vals[order].astype(np.float32)
    rest = float(min(max(1.0 - np.exp(lps.astype(np.float64)).sum(), 0.0), 1.0))
    return ids, lps.astype(np.float16), rest


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-probabilities over the last axis (a fresh array)."""
    x = np.asarray(logits, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    out = x - m
    lse = np.log(np.exp(out).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)
    out -= lse
    return out
