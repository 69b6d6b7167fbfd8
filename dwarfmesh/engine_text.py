"""Text-level engine sessions: members with different tokenizers (rank and fuse-text modes).

A text session holds TEXT: the prompt as this model renders it plus the committed answer.
Its ids are always this tokenizer's canonical encoding of that text; when text is added,
the text is re-encoded, the cache trimmed back to the common prefix with the ids it holds,
and the tail prefilled. Every id's exact log p is kept, so the log p of added text stays
exact when re-encoding changes earlier ids. `propose`, `score` and `text_topk` answer the
leader of a rank or fuse-text session.

This is a mixin of `engine.Engine` (same thread, same session table); it does not stand
alone.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

from dwarfmesh import textfuse
from dwarfmesh.engine_state import (
    DECODE_CONTEXT,
    LOGP_FLOOR,
    PREFILL_STEP,
    Session,
    common_prefix,
    new_cache,
)

_Session = Session
_common_prefix = common_prefix


def _trim(cache: list[Any], n: int, model: str) -> None:
    """Drop the last n positions of `cache`, or fail loudly (never compute on a stale one)."""
    if n and trim_prompt_cache(cache, n) != n:
        raise ValueError(f"{model}'s KV cache cannot be trimmed (a sliding window that has "
                         "wrapped): it cannot take part in text-level sessions this long")


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


class TextEngineMixin:
    """The text-level half of `engine.Engine`."""

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
            s = _Session(new_cache(self.model), None, [], True, time.monotonic())
            self._sessions[session] = s
        s.active, s.templated, s.text = True, templated, text
        self._advance(s, self._encode_text(text, templated))
        return TextLogp(sum(s.token_logp), textfuse.utf8_len(text),
                        (time.perf_counter() - t0) * 1000.0)

    def text_tokens_sync(self, session: str) -> tuple[list[int], list[float]]:
        """The session's ids (this tokenizer's canonical encoding of its text) and every id's
        exact log p given the ids before it (0 for a first id nothing predicts)."""
        s = self._text_session(session)
        return list(s.tokens), list(s.token_logp)

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
        _trim(s.cache, len(old) - keep, self.model_name)
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
            _trim(s.cache, fed, self.model_name)
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
