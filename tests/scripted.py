"""A scripted model behind the real engine, for tests of the session core.

`scripted_engine(name)` is the real `engine.worker.Engine` (its thread, session table,
KV bookkeeping, drafts, top-k) over `ScriptedBackend`, which stands in for the model
library: it computes no network, only a deterministic function of the ids so far. That is
a fair fake for what these tests check (who waits for whom, who takes over, what is
committed, sent, replayed), where a real model would only add seconds and float noise;
the same behaviours are tested on real models in test_failover.py and test_faults.py.

The "model" writes `SCRIPT`: after n ids, the likeliest next byte is SCRIPT's n-th
(cycled), with probability ~0.9; the rest of the mass is spread by a hash of the last ids,
so frames are proper distributions and copies of one model agree exactly.
The tokenizer is bytes (ids 0-255) plus an end-of-text id that the model never favours.

Variants (`variant=v`, 0-2) differ from the script where the prefix's length is v mod 3:
there that variant alone prefers `QUIRK` (0.5 against 0.4), so any two variants pooled
still follow the script, and one variant alone does not: a test can tell which members'
frames a token was fused from. `USELESS` is a model that knows nothing: nearly uniform,
a little fonder of `QUIRK` than of anything else (what the worth policy must keep from
deciding). `ONE_QUIRK` reads and writes like the script except at one position
(`QUIRK_AT` ids), where it prefers `QUIRK`: as strong on a short prompt, one byte apart
in its answer.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import dwarfmesh  # noqa: F401  (OpenBLAS preload before the engine imports mlx)
from dwarfmesh.engine.backend import Loaded
from dwarfmesh.engine.worker import Engine

SCRIPT = (b"def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n"
          b"    pivot = xs[0]\n    left = [x for x in xs[1:] if x < pivot]\n"
          b"    right = [x for x in xs[1:] if x >= pivot]\n"
          b"    return quicksort(left) + [pivot] + quicksort(right)\n")
EOS = 256
VOCAB = 257
QUIRK = ord("~")         # never in SCRIPT
USELESS = -1             # the variant that knows nothing
ONE_QUIRK = -2           # the script but for one position
QUIRK_AT = 24


class ByteDetokenizer:
    """mlx-lm's streaming detokenizer interface over bytes."""

    def __init__(self) -> None:
        self._bytes, self._shown, self.last_segment = b"", 0, ""

    def reset(self) -> None:
        self.__init__()

    def add_token(self, token: int) -> None:
        if token < 256:
            self._bytes += bytes([token])
        text = self._bytes.decode("utf-8", errors="ignore")
        self.last_segment, self._shown = text[self._shown:], len(text)

    def finalize(self) -> None:
        text = self._bytes.decode("utf-8", errors="replace")
        self.last_segment, self._shown = text[self._shown:], len(text)

    @property
    def text(self) -> str:
        return self._bytes.decode("utf-8", errors="replace")


class ByteTokenizer:
    eos_token_ids = [EOS]
    bos_token = None
    chat_template = None
    all_special_tokens: list[str] = ["<eot>"]

    def get_vocab(self) -> dict[str, int]:
        return {**{f"<0x{i:02X}>": i for i in range(256)}, "<eot>": EOS}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode())

    def decode(self, ids: list[int], **_: Any) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    @property
    def detokenizer(self) -> ByteDetokenizer:
        return ByteDetokenizer()


def script_next(ids: list[int]) -> int:
    """The byte the scripted model favours after `ids`: SCRIPT's byte at that position
    (cycled), so a prompt that is a prefix of SCRIPT is continued as SCRIPT goes on."""
    return SCRIPT[len(ids) % len(SCRIPT)]


def script_logprobs(ids: list[int], variant: int | None = None) -> np.ndarray:
    seed = int.from_bytes(hashlib.blake2b(bytes(min(i, 255) for i in ids[-8:]),
                                          digest_size=8).digest(), "little")
    rest = np.random.default_rng(seed).random(VOCAB).astype(np.float64) + 0.01
    rest[EOS] = 1e-6
    if variant == USELESS:
        p = rest / rest.sum()
        p[QUIRK] += 0.05
        return np.log(p / p.sum()).astype(np.float32)
    rest = 0.1 * rest / rest.sum()
    p = rest
    if (variant == ONE_QUIRK and len(ids) == QUIRK_AT) or (
            variant is not None and variant >= 0 and len(ids) % 3 == variant):
        p[script_next(ids)] += 0.4
        p[QUIRK] += 0.5
    else:
        p[script_next(ids)] += 0.9
    return np.log(p).astype(np.float32)


@dataclass
class Cache:
    ids: list[int] = field(default_factory=list)


class ScriptedBackend:
    """The backend contract (`engine.backend.Backend`) over `script_logprobs`. A test can
    make a forward slow (`delay(step, seconds)`): it sleeps on the engine's thread, as a
    busy machine would."""

    name = "scripted"

    def __init__(self, variant: int | None = None) -> None:
        self.variant = variant
        self.delays: dict[int, float] = {}      # cache length after the forward -> seconds

    def delay(self, position: int, seconds: float) -> None:
        self.delays[position] = seconds

    def load(self) -> Loaded:
        return Loaded(ByteTokenizer(), VOCAB, 4096)

    def new_cache(self) -> Cache:
        return Cache()

    def free(self, cache: Cache) -> None:
        cache.ids.clear()

    def trimmable(self, cache: Cache) -> bool:
        return True

    def trim(self, cache: Cache, n: int) -> None:
        if n > len(cache.ids):
            raise ValueError("trim past the start")
        del cache.ids[len(cache.ids) - n:]

    def _append(self, cache: Cache, ids: list[int]) -> list[np.ndarray]:
        rows = []
        for i in ids:
            cache.ids.append(int(i))
            rows.append(script_logprobs(cache.ids, self.variant))
        time.sleep(self.delays.get(len(cache.ids), 0.0))
        return rows

    def forward(self, cache: Cache, ids: list[int],
                targets: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        rows = self._append(cache, ids)
        got = np.array([rows[i][t] for i, t in enumerate(targets or [])], np.float32)
        return rows[-1], got

    def forward_all(self, cache: Cache, ids: list[int]) -> np.ndarray:
        return np.stack(self._append(cache, ids))

    def score(self, cache: Cache, held: int, keep: int,
              rows: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        prefix, out = cache.ids[:keep], []
        for row in rows:
            ids = prefix + [int(t) for t in row]
            got = [script_logprobs(ids[:keep + i + 1], self.variant)[row[i + 1]]
                   for i in range(len(row) - 1)]
            out.append((np.array(got, np.float32), script_logprobs(ids, self.variant)))
        return out

    def release(self) -> None:
        pass


def scripted_engine(name: str = "scripted", variant: int | None = None) -> Engine:
    engine = Engine(model_name=name, backend=ScriptedBackend(variant))
    engine.load_sync()
    return engine


def script_greedy(prompt: str, max_tokens: int) -> list[int]:
    """What a mesh of scripted copies (or of two variants or more) must answer, computed
    without the engine."""
    ids, out = list(prompt.encode()), []
    for _ in range(max_tokens):
        out.append(int(np.argmax(script_logprobs(ids))))
        ids.append(out[-1])
    return out
