"""The engine: the one thread that owns mlx, and one KV cache per session.

Every mlx call of a node happens on the engine's single worker thread (mlx streams are
thread-local, and a model is not safe to drive from two threads). The asyncio side calls
`await engine.open(...)` / `step(...)` / `close(...)`; the work runs on that thread and the
result comes back through the executor's future.

Per session the engine keeps: the KV cache, the log-probabilities of the next token (to
report the exact log p of whichever token the leader commits, even outside the top-k),
and the number of tokens processed. The engine knows nothing about the network, fusion or
who leads; it computes frames.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import dwarfmesh  # noqa: F401  (OpenBLAS preload must precede the mlx import)
import mlx.core as mx
from mlx_lm import load as mlx_load
from mlx_lm.models.cache import make_prompt_cache

log = logging.getLogger(__name__)

PREFILL_STEP = 512          # prompt tokens per forward during prefill (bounds logits memory)
LOGP_FLOOR = -1e4           # exact log p reported for a token of probability 0


@dataclass(frozen=True)
class StepOut:
    """One member frame's payload: top-k of the next token, and bookkeeping."""

    ids: np.ndarray              # uint32 [k], best first
    logprobs: np.ndarray         # float16 [k]
    rest_mass: float             # 1 - sum(p(top-k))
    prev_logp: float | None      # exact log p of the token just appended (None after prefill)
    prompt_nll: float | None     # mean NLL per prompt token after prefill
    forward_ms: float
    position: int                # tokens in the cache after this step


@dataclass
class _Session:
    cache: list[Any]
    logprobs: Any                # mx.array [V] float32: distribution of the next token
    position: int


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the vocabulary (token -> id) and special tokens: equal means fusable by id."""
    vocab = tokenizer.get_vocab()
    items = sorted(vocab.items(), key=lambda kv: kv[1])
    h = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode())
    h.update(repr(sorted(getattr(tokenizer, "all_special_tokens", []) or [])).encode())
    return h.hexdigest()[:16]


class Engine:
    """Loads one mlx-lm model and serves top-k frames for many sessions, one thread."""

    def __init__(self, model_path: str | Path, *, model_name: str | None = None) -> None:
        self.model_path = str(model_path)
        self.model_name = model_name or Path(self.model_path).name
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlx")
        self._sessions: dict[str, _Session] = {}
        self.model: Any = None
        self.tokenizer: Any = None
        self.vocab_size = 0
        self.fingerprint = ""
        self.eos_ids: set[int] = set()

    # --- asyncio side -------------------------------------------------------------------

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def load(self) -> None:
        await self._run(self.load_sync)

    async def open(self, session: str, prompt_ids: list[int] | np.ndarray, k: int) -> StepOut:
        return await self._run(self.open_sync, session, prompt_ids, k)

    async def step(self, session: str, token_id: int, k: int) -> StepOut:
        return await self._run(self.step_sync, session, token_id, k)

    async def close(self, session: str) -> None:
        await self._run(self.close_sync, session)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # --- model thread -------------------------------------------------------------------

    def load_sync(self) -> None:
        t0 = time.perf_counter()
        model, tokenizer = mlx_load(self.model_path)
        if mx.default_device() == mx.cpu:
            # fp16/bf16 matmuls are very slow on the CPU backend; float32 is the fast path.
            model.set_dtype(mx.float32)
        mx.eval(model.parameters())
        self.model, self.tokenizer = model, tokenizer
        probe = model(mx.array([[0]]))
        self.vocab_size = int(probe.shape[-1])
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        self.eos_ids = set(int(i) for i in tokenizer.eos_token_ids)
        log.info("loaded %s in %.1fs (vocab %d, tokenizer %s)", self.model_name,
                 time.perf_counter() - t0, self.vocab_size, self.fingerprint[:8])

    def _topk(self, logprobs: Any, k: int) -> tuple[np.ndarray, np.ndarray, float]:
        k = min(k, logprobs.shape[-1])
        idx = mx.argpartition(-logprobs, kth=k - 1)[:k]
        vals = logprobs[idx]
        order = mx.argsort(-vals)
        idx, vals = idx[order], vals[order]
        ids = np.array(idx, dtype=np.uint32)
        lps = np.array(vals, dtype=np.float32)
        rest = float(min(max(1.0 - np.exp(lps.astype(np.float64)).sum(), 0.0), 1.0))
        return ids, lps.astype(np.float16), rest

    def open_sync(self, session: str, prompt_ids: list[int] | np.ndarray, k: int) -> StepOut:
        """Prefill the prompt into a new cache; return the first frame and the prompt NLL."""
        t0 = time.perf_counter()
        ids = mx.array(np.asarray(prompt_ids, dtype=np.int64).astype(np.int32))
        n = int(ids.shape[0])
        if n == 0:
            raise ValueError("empty prompt")
        cache = make_prompt_cache(self.model)
        nll_sum, done = 0.0, 0
        # Like mlx-lm's generate_step: all but the last token in chunks, then the last one,
        # so a one-member mesh computes exactly what mlx-lm computes.
        while n - done > 1:
            m = min(PREFILL_STEP, n - done - 1)
            chunk = ids[done:done + m]
            logits = self.model(chunk[None], cache=cache)[0].astype(mx.float32)
            targets = ids[done + 1:done + m + 1]
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            nll = -mx.take_along_axis(lp, targets[:, None], axis=-1).sum()
            mx.eval(nll, [c.state for c in cache])
            nll_sum += float(nll)
            done += m
        logits = self.model(ids[done:][None], cache=cache)[0, -1].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits)
        mx.eval(logprobs)
        self._sessions[session] = _Session(cache=cache, logprobs=logprobs, position=n)
        top_ids, top_lp, rest = self._topk(logprobs, k)
        return StepOut(top_ids, top_lp, rest, None, nll_sum / (n - 1) if n > 1 else None,
                       (time.perf_counter() - t0) * 1000.0, n)

    def step_sync(self, session: str, token_id: int, k: int) -> StepOut:
        """Append the committed token; return its exact log p and the next frame."""
        t0 = time.perf_counter()
        s = self._sessions.get(session)
        if s is None:
            raise KeyError(f"unknown session {session}")
        if not 0 <= token_id < s.logprobs.shape[-1]:
            raise ValueError(f"token id {token_id} outside the vocabulary")
        prev_logp = max(float(s.logprobs[token_id]), LOGP_FLOOR)
        logits = self.model(mx.array([[token_id]], dtype=mx.int32), cache=s.cache)[0, -1]
        logits = logits.astype(mx.float32)
        s.logprobs = logits - mx.logsumexp(logits)
        mx.eval(s.logprobs)
        s.position += 1
        top_ids, top_lp, rest = self._topk(s.logprobs, k)
        return StepOut(top_ids, top_lp, rest, prev_logp, None,
                       (time.perf_counter() - t0) * 1000.0, s.position)

    def close_sync(self, session: str) -> None:
        if self._sessions.pop(session, None) is not None and not self._sessions:
            mx.clear_cache()

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    # --- text (thread-safe: the HF fast tokenizer is Rust and does not touch mlx) -----------

    def encode(self, text: str, *, chat: bool = False) -> list[int]:
        """Token ids of `text`; with chat=True, wrapped in the model's chat template."""
        tok = self.tokenizer
        if chat and getattr(tok, "chat_template", None):
            messages = [{"role": "user", "content": text}]
            out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(out["input_ids"] if isinstance(out, dict) else out)
        # Exactly as mlx-lm's stream_generate does, so a one-model mesh matches mlx-lm.
        bos = getattr(tok, "bos_token", None)
        ids = tok.encode(text, add_special_tokens=bos is None or not text.startswith(bos))
        return list(ids)

    def detokenizer(self) -> Any:
        """A fresh streaming detokenizer (mlx-lm's) for one answer."""
        return self.tokenizer.detokenizer
