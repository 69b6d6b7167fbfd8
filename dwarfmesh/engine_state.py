"""What the engine keeps per session, its sizing constants and its KV caches (shared by
`engine` and `engine_text`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

PREFILL_STEP = 512          # prompt tokens per forward during prefill (bounds logits memory)
LOGP_FLOOR = -1e4           # exact log p reported for a token of probability 0
MAX_SESSIONS = 16           # KV caches one engine holds at once (idle ones are evicted first)
SESSION_IDLE_S = 900.0      # a kept conversation cache idle this long is freed
# Architectures whose forward builds the sliding-window masks from the window size itself
# (mlx-lm's gemma3_text does), so a plain KV cache in their local layers gives the same
# logits as mlx-lm's rotating one, and unlike it can always be trimmed.
WINDOW_MASKED = frozenset({"gemma3_text"})
DECODE_CONTEXT = 8          # tokens of context when decoding a new piece (SentencePiece spaces)


@dataclass
class Session:
    cache: list[Any]
    logprobs: Any                # mx.array [V] float32: distribution of the next token
    tokens: list[int]            # ids whose keys/values are in the cache
    active: bool = True          # False: kept between turns, may be evicted
    last_used: float = 0.0
    # text-level sessions only (issue 6): the text the ids encode, every id's exact log p
    text: str = ""
    templated: bool = False      # text is a rendered chat template: encode without specials
    token_logp: list[float] = field(default_factory=list)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def new_cache(model: Any) -> list[Any]:
    """A prompt cache that can be trimmed back to any length.

    mlx-lm gives sliding-window layers a RotatingKVCache, which cannot be trimmed once it
    has wrapped (past the window, 512 tokens for gemma-3): a conversation's next turn, a
    text session's re-sync and a rank proposal all trim. For `WINDOW_MASKED` models those
    layers get a plain KVCache instead (the window is enforced by the mask; memory grows
    with the context like the global layers'). Other rotating caches are kept as they are;
    the engine then starts such a session over (id path) or refuses it (text path).
    """
    cache = make_prompt_cache(model)
    if getattr(model, "model_type", None) in WINDOW_MASKED:
        cache = [KVCache() if isinstance(c, RotatingKVCache) else c for c in cache]
    return cache
