"""The engine: the one thread that owns mlx, and one KV cache per session.

Every mlx call of a node happens on the engine's single worker thread (mlx streams are
thread-local, and a model is not safe to drive from two threads). The asyncio side calls
`await engine.open(...)` / `step(...)` / `close(...)`; the work runs on that thread and the
result comes back through the executor's future.

Per session the engine keeps: the KV cache, the log-probabilities of the next token (to
report the exact log p of whichever token the leader commits, even outside the top-k),
and the number of tokens processed. The engine knows nothing about the network, fusion or
who leads; it computes frames.

Text-level sessions (issue 6, members with different tokenizers) hold text instead of ids:
`text_open` / `text_extend` re-encode the text and trim the cache to the common prefix;
`propose`, `score` and `text_topk` answer the leader of a rank or fuse session.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm import load as mlx_load
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache

import dwarfmesh  # noqa: F401  (OpenBLAS preload must precede the mlx import)
from dwarfmesh import textfuse

log = logging.getLogger(__name__)

PREFILL_STEP = 512          # prompt tokens per forward during prefill (bounds logits memory)
LOGP_FLOOR = -1e4           # exact log p reported for a token of probability 0
MAX_SESSIONS = 16           # KV caches one engine holds at once (idle ones are evicted first)
SESSION_IDLE_S = 900.0      # a kept conversation cache idle this long is freed
DECODE_CONTEXT = 8          # tokens of context when decoding a new piece (SentencePiece spaces)


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


@dataclass
class _Session:
    cache: list[Any]
    logprobs: Any                # mx.array [V] float32: distribution of the next token
    tokens: list[int]            # ids whose keys/values are in the cache
    active: bool = True          # False: kept between turns, may be evicted
    last_used: float = 0.0
    # text-level sessions only (issue 6): the text the ids encode, every id's exact log p
    text: str = ""
    templated: bool = False      # text is a rendered chat template: encode without specials
    token_logp: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class TextLogp:
    """text_open / text_extend: the exact log p of the text just added, and its size."""

    logp: float                  # log P(ids(new text)) - log P(ids(old text)), nats
    nbytes: int                  # UTF-8 bytes of the text just added
    forward_ms: float


@dataclass(frozen=True)
class Proposed:
    """propose: a continuation of the session's text, cut at a word or line boundary."""

    text: str
    eos: bool
    tokens: int                  # tokens generated (some may lie past the cut)
    forward_ms: float


@dataclass(frozen=True)
class TextTopKOut:
    """text_topk: the next piece's top-k as strings (see textfuse's module doc)."""

    texts: list[str]
    logprobs: np.ndarray         # float16, duplicates summed
    eos_logp: float
    rest_mass: float
    forward_ms: float


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

    async def step(self, session: str, token_ids: int | list[int], k: int) -> StepOut:
        return await self._run(self.step_sync, session, token_ids, k)

    async def close(self, session: str, keep: bool = False) -> None:
        await self._run(self.close_sync, session, keep)

    async def sweep(self, idle_s: float = SESSION_IDLE_S) -> list[str]:
        return await self._run(self.sweep_sync, idle_s)

    async def text_open(self, session: str, text: str, templated: bool) -> TextLogp:
        return await self._run(self.text_open_sync, session, text, templated)

    async def text_extend(self, session: str, piece: str) -> TextLogp:
        return await self._run(self.text_extend_sync, session, piece)

    async def propose(self, session: str, max_tokens: int, temperature: float = 0.0,
                      seed: list[int] | None = None) -> Proposed:
        return await self._run(self.propose_sync, session, max_tokens, temperature, seed)

    async def score(self, session: str, texts: list[str], eos: list[bool]) -> list[float]:
        return await self._run(self.score_sync, session, texts, eos)

    async def text_topk(self, session: str, k: int) -> TextTopKOut:
        return await self._run(self.text_topk_sync, session, k)

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
            cache = make_prompt_cache(self.model)
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

    # --- text-level sessions (issue 6: members with different tokenizers) -----------------
    # A text session holds TEXT: the prompt as this model renders it plus the committed
    # answer. Its ids are always this tokenizer's canonical encoding of that text; when text
    # is added, the text is re-encoded, the cache trimmed back to the common prefix with the
    # ids it holds, and the tail prefilled. Every id's exact log p is kept, so the log p of
    # added text stays exact when re-encoding changes earlier ids.

    def render_prompt(self, prompt: str, messages: list[dict[str, Any]] | None,
                      chat: bool) -> tuple[str, bool]:
        """The prompt as text in this model's format; True if it is a rendered template."""
        turns = messages or ([{"role": "user", "content": prompt}] if chat else None)
        if not turns:
            return prompt, False
        if not getattr(self.tokenizer, "chat_template", None):
            return "".join(f"{m['role']}: {m['content']}\n" for m in turns) + "assistant:", False
        return self.tokenizer.apply_chat_template(turns, add_generation_prompt=True,
                                                  tokenize=False), True

    def _encode_text(self, text: str, templated: bool) -> list[int]:
        if templated:   # the rendered template carries its own special tokens
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        return self.encode(text)

    def _text_session(self, session: str) -> _Session:
        s = self._sessions.get(session)
        if s is None or len(s.token_logp) != len(s.tokens):
            raise KeyError(f"unknown text session {session}")
        s.last_used = time.monotonic()
        return s

    def text_open_sync(self, session: str, text: str, templated: bool) -> TextLogp:
        """Start (or, for a kept conversation, re-sync) a text session on `text`."""
        t0 = time.perf_counter()
        if not text:
            raise ValueError("empty prompt")
        s = self._sessions.get(session)
        if s is None or len(s.token_logp) != len(s.tokens) or not can_trim_prompt_cache(s.cache):
            self._sessions.pop(session, None)
            self._make_room(session)
            s = _Session(make_prompt_cache(self.model), None, [], True, time.monotonic())
            self._sessions[session] = s
        s.active, s.templated, s.text = True, templated, text
        self._advance(s, self._encode_text(text, templated))
        return TextLogp(sum(s.token_logp), textfuse.utf8_len(text),
                        (time.perf_counter() - t0) * 1000.0)

    def text_extend_sync(self, session: str, piece: str) -> TextLogp:
        """Append committed text; return its exact log p under this model."""
        t0 = time.perf_counter()
        s = self._text_session(session)
        s.text += piece
        logp = self._advance(s, self._encode_text(s.text, s.templated))
        return TextLogp(logp, textfuse.utf8_len(piece), (time.perf_counter() - t0) * 1000.0)

    def _advance(self, s: _Session, ids: list[int]) -> float:
        """Make the cache hold `ids`; return log P(ids) - log P(the ids it held)."""
        old, lps = s.tokens, s.token_logp
        common = _common_prefix(old, ids)
        if common == len(ids) == len(old):
            return 0.0
        removed = sum(lps[common:])
        # Keep the cache up to `keep`; the log p of ids[keep] is known without a forward:
        # held in s.logprobs (a clean append), or unchanged (re-feeding ids[common-1] to get
        # the prediction for ids[common] back), or 0 for a first token nothing predicts.
        if common == len(old) and s.logprobs is not None:
            keep, first = common, float(s.logprobs[ids[common]])
        else:
            keep = max(common - 1, 0)
            first = lps[keep] if common > 0 else 0.0
        trim_prompt_cache(s.cache, len(old) - keep)
        new = [max(first, LOGP_FLOOR)]
        pos = keep
        while pos < len(ids):
            chunk = ids[pos:pos + PREFILL_STEP]
            logits = self.model(mx.array([chunk], dtype=mx.int32), cache=s.cache)[0]
            logp = logits.astype(mx.float32)
            logp = logp - mx.logsumexp(logp, axis=-1, keepdims=True)
            targets = mx.array(ids[pos + 1:pos + 1 + len(chunk)], dtype=mx.int32)
            got = mx.take_along_axis(logp[:targets.size], targets[:, None], axis=-1)
            s.logprobs = logp[-1]
            mx.eval(got, s.logprobs)
            new.extend(max(float(v), LOGP_FLOOR) for v in np.array(got).reshape(-1))
            pos += len(chunk)
        s.tokens, s.token_logp = list(ids), lps[:keep] + new
        return sum(new[common - keep:]) - removed

    def _eos_logp(self, logprobs: Any) -> Any:
        """log p(any end-of-text id) over the last axis."""
        if not self.eos_ids:
            return mx.full(logprobs.shape[:-1], LOGP_FLOOR)
        return mx.logsumexp(logprobs[..., mx.array(sorted(self.eos_ids), dtype=mx.int32)],
                            axis=-1)

    def _decode_tail(self, context: list[int], base: str, ids: list[int]) -> str:
        """The text `ids` add after `context` (whose decoding is `base`)."""
        whole = self.tokenizer.decode(context + ids, clean_up_tokenization_spaces=False)
        if whole.startswith(base):
            return whole[len(base):]
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)

    def propose_sync(self, session: str, max_tokens: int, temperature: float = 0.0,
                     seed: list[int] | None = None) -> Proposed:
        """Generate up to max_tokens from the session's text, cut at a word or line
        boundary (textfuse.proposal_cut); the cache is trimmed back afterwards."""
        t0 = time.perf_counter()
        s = self._text_session(session)
        context = s.tokens[-DECODE_CONTEXT:]
        base = self.tokenizer.decode(context, clean_up_tokenization_spaces=False)
        rng = np.random.default_rng(seed or [0]) if temperature > 0 else None
        logprobs, gen, fed, eos, text = s.logprobs, [], 0, False, ""
        try:
            while len(gen) < max_tokens:
                if rng is None:
                    tok = int(mx.argmax(logprobs))
                else:
                    x = np.array(logprobs, dtype=np.float64) / temperature
                    p = np.exp(x - x.max())
                    tok = int(rng.choice(len(p), p=p / p.sum()))
                if tok in self.eos_ids:
                    eos = True
                    break
                gen.append(tok)
                text = self._decode_tail(context, base, gen)
                if len(gen) == max_tokens or textfuse.proposal_cut(text, done=False) is not None:
                    break
                logits = self.model(mx.array([[tok]], dtype=mx.int32), cache=s.cache)[0, -1]
                logprobs = logits.astype(mx.float32) - mx.logsumexp(logits.astype(mx.float32))
                fed += 1
        finally:
            trim_prompt_cache(s.cache, fed)
        text = textfuse.complete_text(text)
        if not eos:
            text = text[:textfuse.proposal_cut(text, done=True) or 0]
        return Proposed(text, eos, len(gen), (time.perf_counter() - t0) * 1000.0)

    def score_sync(self, session: str, texts: list[str], eos: list[bool]) -> list[float]:
        """Each candidate's NLL as a continuation of the session's text, exactly:
        -(log P(ids(text + c)) - log P(ids(text))) [- log P(EOS) after it], in one batched
        forward over copies of the cache, which itself is left as it was."""
        s = self._text_session(session)
        fulls = [self._encode_text(s.text + t, s.templated) for t in texts]
        commons = [_common_prefix(s.tokens, f) for f in fulls]
        keep = max(min(commons) - 1, 0)
        rows = [f[keep:] for f in fulls]
        width = max(len(r) for r in rows)
        try:
            caches = []
            for c in s.cache:
                c = copy.copy(c)
                c.trim(len(s.tokens) - keep)
                caches.append(c.merge([c] * len(rows)))
        except AttributeError:
            raise ValueError(f"{self.model_name}'s KV cache cannot be batched") from None
        batch = mx.array([r + [0] * (width - len(r)) for r in rows], dtype=mx.int32)
        logp = self.model(batch, cache=caches).astype(mx.float32)
        logp = logp - mx.logsumexp(logp, axis=-1, keepdims=True)
        targets = mx.array([r[1:] + [0] * (width - len(r)) for r in rows], dtype=mx.int32)
        got = mx.take_along_axis(logp[:, :-1], targets[..., None], axis=-1)[..., 0]
        last = mx.array([len(r) - 1 for r in rows], dtype=mx.int32)
        end = self._eos_logp(logp[mx.arange(len(rows)), last])
        mx.eval(got, end)
        got, end = np.maximum(np.array(got, dtype=np.float64), LOGP_FLOOR), np.array(end)
        out = []
        for i, (full, common) in enumerate(zip(fulls, commons)):
            start = max(common, 1) - keep - 1              # got[i, j] is log p(full[keep+j+1])
            gained = got[i, start:len(full) - keep - 1].sum()
            nll = -gained + sum(s.token_logp[common:])
            out.append(float(nll - (max(float(end[i]), LOGP_FLOOR) if eos[i] else 0.0)))
        return out

    def text_topk_sync(self, session: str, k: int) -> TextTopKOut:
        """The next piece's top-k as the strings the tokens add to the text (EOS apart)."""
        t0 = time.perf_counter()
        s = self._text_session(session)
        ids, _, _ = self._topk(s.logprobs, k)
        lps = np.array(s.logprobs[mx.array(ids.astype(np.int32))], dtype=np.float64)
        eos_logp = float(self._eos_logp(s.logprobs))
        special = set(getattr(self.tokenizer, "all_special_ids", []) or []) | self.eos_ids
        context = s.tokens[-DECODE_CONTEXT:]
        base = self.tokenizer.decode(context, clean_up_tokenization_spaces=False)
        probs: dict[str, float] = {}
        for tok, lp in zip(ids.tolist(), lps):
            piece = "" if tok in special else self._decode_tail(context, base, [tok])
            if piece and "\ufffd" not in piece:    # incomplete characters are left out
                probs[piece] = probs.get(piece, 0.0) + float(np.exp(lp))
        rest = 1.0 - sum(probs.values()) - float(np.exp(eos_logp))
        return TextTopKOut(list(probs), np.log(np.array(list(probs.values()))).astype(np.float16),
                           max(eos_logp, LOGP_FLOOR), min(max(rest, 0.0), 1.0),
                           (time.perf_counter() - t0) * 1000.0)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
