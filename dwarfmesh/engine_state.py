"""What the engine keeps per session, and its sizing constants (shared by `engine` and
`engine_text`; no mlx calls here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PREFILL_STEP = 512          # prompt tokens per forward during prefill (bounds logits memory)
LOGP_FLOOR = -1e4           # exact log p reported for a token of probability 0
MAX_SESSIONS = 16           # KV caches one engine holds at once (idle ones are evicted first)
SESSION_IDLE_S = 900.0      # a kept conversation cache idle this long is freed
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
