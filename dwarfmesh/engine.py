"""The engine: the one thread that owns mlx, and one KV cache per session.

Every mlx call of a node happens on the engine's single worker thread (mlx streams are
thread-local, and a model is not safe to drive from two threads). The asyncio side calls
`await engine.open(...)` / `step(...)` / `close(...)`; the work runs on that thread and the
result comes back through the executor's future.

Per session the engine keeps: the KV cache, the log-probabilities of the next token (to
report the exact log p of whichever token the leader commits, even outside the top-k),
and the number of tokens processed. The engine knows nothing about the network, fusion or
who leads; it computes frames.

Text-level sessions (members with different tokenizers) are `engine_text.TextEngineMixin`'s:
they hold text instead of ids, on the same thread and the same session table.
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

import mlx.core as mx
import numpy as np
from mlx_lm import load as mlx_load
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from dwarfmesh.engine_state import (  # noqa: F401  (re-exported: the engine's constants)
    DECODE_CONTEXT,
    LOGP_FLOOR,
    MAX_SESSIONS,
    PREFILL_STEP,
    SESSION_IDLE_S,
    new_cache,
)
from dwarfmesh.engine_state import (
    Session as _Session,
)
from dwarfmesh.engine_state import (
    common_prefix as _common_prefix,
)
from dwarfmesh.engine_text import Proposed, TextEngineMixin, TextLogp, TextTopKOut  # noqa: F401

log = logging.getLogger(__name__)



class EngineBusy(RuntimeError):
    """Every session slot is taken by an active session."""


@dataclass(frozen=True)
class StepOut:
    """One member frame's payload: top-k of the next token, and bookkeeping."""

    ids: np.ndarray              # uint32 [k], best first
    logprobs: np.ndarray         # float16 [k]
    rest_mass: float             # 1 - sum(p(top-k))
    prev_logp: float | None      # exact log p of the token just appended (None after prefill)
    prompt_nll: float | None     # mean NLL per newly prefilled prompt token
    forward_ms: float
    position: int                # tokens in the cache after this step
    reused: int = 0              # prompt tokens whose KV cache was reused from the last turn


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the vocabulary (token -> id) and special tokens: equal means fusable by id."""
    vocab = tokenizer.get_vocab()
    items = sorted(vocab.items(), key=lambda kv: kv[1])
    h = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode())
    h.update(repr(sorted(getattr(tokenizer, "all_special_tokens", []) or [])).encode())
    return h.hexdigest()[:16]


class Engine(TextEngineMixin):
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
        self.context_length: int | None = None

    # --- asyncio side -------------------------------------------------------------------

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    async def load(self) -> None:
        await self._run(self.load_sync)

    async def open(self, session: str, prompt_ids: list[int] | np.ndarray, k: int) -> StepOut:
        return await self._run(self.open_sync, session, prompt_ids, k)

    async def step(self, session: str, token_ids: int | list[int], k: int) -> StepOut:
        return await self._run(self.step_sync, session, token_ids, k)

    async def close(self, session: str, keep: bool = False) -> None:
        await self._run(self.close_sync, session, keep)

    async def sweep(self, idle_s: float = SESSION_IDLE_S) -> list[str]:
        return await self._run(self.sweep_sync, idle_s)

    def shutdown(self, wait: bool = True) -> None:
        """Stop taking work; with wait, also let the model thread finish and exit."""
        self._pool.shutdown(wait=wait, cancel_futures=True)

    # --- model thread -------------------------------------------------------------------

    def load_sync(self) -> None:
        t0 = time.perf_counter()
        model, tokenizer, config = mlx_load(self.model_path, return_config=True)
        self.context_length = int(config.get("max_position_embeddings") or 0) or None
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
        """Prefill the prompt; return the first frame and the prompt NLL.

        If this session's cache is still held from an earlier turn (a conversation), only
        the ids after the longest common prefix are computed: the cache is trimmed back to
        that prefix and the rest is prefilled.
        """
        t0 = time.perf_counter()
        new_ids = [int(t) for t in np.asarray(prompt_ids).reshape(-1)]
        n = len(new_ids)
        if n == 0:
            raise ValueError("empty prompt")
        s = self._sessions.get(session)
        reuse = 0
        if s is not None and can_trim_prompt_cache(s.cache):
            reuse = _common_prefix(s.tokens, new_ids)
            reuse = min(reuse, n - 1)          # at least one token must produce logits
            trim_prompt_cache(s.cache, len(s.tokens) - reuse)
            cache = s.cache
        else:
            self._make_room(session)
            cache = new_cache(self.model)
        ids = mx.array(np.asarray(new_ids, dtype=np.int32))
        nll_sum, done = 0.0, reuse
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
        self._sessions[session] = _Session(cache, logprobs, new_ids, True, time.monotonic())
        top_ids, top_lp, rest = self._topk(logprobs, k)
        scored = n - 1 - reuse
        return StepOut(top_ids, top_lp, rest, None, nll_sum / scored if scored > 0 else None,
                       (time.perf_counter() - t0) * 1000.0, n, reuse)

    def _make_room(self, session: str) -> None:
        if len(self._sessions) < MAX_SESSIONS:
            return
        idle = [(v.last_used, key) for key, v in self._sessions.items() if not v.active]
        if not idle:
            raise EngineBusy(f"{self.model_name} holds {MAX_SESSIONS} active sessions; "
                             "try again when one ends")
        _, oldest = min(idle)
        log.info("evicting idle conversation %s to make room for %s", oldest, session)
        del self._sessions[oldest]

    def step_sync(self, session: str, token_ids: int | list[int], k: int) -> StepOut:
        """Append committed token(s); return the last one's exact log p and the next frame.

        Several tokens at once is how a member that fell behind catches up: one forward
        over all of them, one frame for the newest step.
        """
        t0 = time.perf_counter()
        s = self._sessions.get(session)
        if s is None:
            raise KeyError(f"unknown session {session}")
        toks = [token_ids] if isinstance(token_ids, int) else [int(t) for t in token_ids]
        vocab = s.logprobs.shape[-1]
        if not toks or not all(0 <= t < vocab for t in toks):
            raise ValueError(f"token ids {toks} outside the vocabulary")
        if len(toks) == 1:
            prev_logp = float(s.logprobs[toks[0]])
        logits = self.model(mx.array([toks], dtype=mx.int32), cache=s.cache)[0]
        logits = logits.astype(mx.float32)
        if len(toks) > 1:
            before = logits[-2] - mx.logsumexp(logits[-2])
            prev_logp = float(before[toks[-1]])
        s.tokens.extend(toks)
        s.logprobs = logits[-1] - mx.logsumexp(logits[-1])
        mx.eval(s.logprobs)
        s.last_used = time.monotonic()
        top_ids, top_lp, rest = self._topk(s.logprobs, k)
        return StepOut(top_ids, top_lp, rest, max(prev_logp, LOGP_FLOOR), None,
                       (time.perf_counter() - t0) * 1000.0, len(s.tokens))

    def close_sync(self, session: str, keep: bool = False) -> None:
        """End a session's turn: free its cache, or keep it (idle) for the next turn."""
        s = self._sessions.get(session)
        if s is None:
            return
        if keep:
            s.active, s.last_used = False, time.monotonic()
            return
        del self._sessions[session]
        if not self._sessions:
            mx.clear_cache()

    def sweep_sync(self, idle_s: float = SESSION_IDLE_S) -> list[str]:
        """Free kept conversation caches idle for longer than idle_s; return their ids."""
        now = time.monotonic()
        old = [k for k, v in self._sessions.items() if not v.active and now - v.last_used > idle_s]
        for key in old:
            del self._sessions[key]
        if old and not self._sessions:
            mx.clear_cache()
        return old

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    # --- text (thread-safe: the HF fast tokenizer is Rust and does not touch mlx) -----------

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a conversation in this model's chat template, ready for the reply."""
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
            return self.encode(text)
        out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) else out)

    def encode(self, text: str, *, chat: bool = False) -> list[int]:
        """Token ids of `text`; with chat=True, wrapped in the model's chat template."""
        tok = self.tokenizer
        if chat:
            return self.encode_chat([{"role": "user", "content": text}])
        # Exactly as mlx-lm's stream_generate does, so a one-model mesh matches mlx-lm.
        bos = getattr(tok, "bos_token", None)
        ids = tok.encode(text, add_special_tokens=bos is None or not text.startswith(bos))
        return list(ids)

    def detokenizer(self) -> Any:
        """A fresh streaming detokenizer (mlx-lm's) for one answer."""
        return self.tokenizer.detokenizer
