"""Text-level engine sessions: members with different tokenizers (rank and fuse-text modes).

A text session holds TEXT: the prompt as this model renders it plus the committed answer.
Its ids are always this tokenizer's canonical encoding of that text; when text is added,
the text is re-encoded, the cache trimmed back to the common prefix with the ids it holds,
and the tail prefilled. Every id's exact log p is kept, so the log p of added text stays
exact when re-encoding changes earlier ids. `propose`, `score` and `topk` answer the
leader of a rank or fuse-text session.

`TextSessions` is a part of `engine.worker.Engine` (its session table, its backend, its
thread: every method here runs on the engine's thread). It computes log-probabilities
of text; how members' answers are combined is fusion's, not this module's.

Owns: text-level sessions on the engine's thread. Does not: fuse, message, or choose.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from dwarfmesh.engine.kv import (
    DECODE_CONTEXT,
    LOGP_FLOOR,
    PREFILL_STEP,
    Session,
    common_prefix,
    top_k,
)
from dwarfmesh.fusion.textcut import complete_text, proposal_cut, stop_at, utf8_len

if TYPE_CHECKING:
    from dwarfmesh.engine.worker import Engine

UTF8_TAIL_TOKENS = 8    # tokens a proposal may run past its budget to finish a character
SCORE_BATCH_TOKENS = 2048   # candidates x longest candidate scored in one padded batch


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


class TextSessions:
    """The text-level half of an `Engine`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Sessions whose answer is over (End, cancel) while a whole answer may still be
        # being written: `propose` stops at its next token. Set from the event loop's
        # thread (a set's add is atomic), read here on the engine's.
        self.interrupted: set[str] = set()

    def interrupt(self, session: str) -> None:
        """Stop a whole answer that `session` is writing (select) at its next token."""
        self.interrupted.add(session)

    @property
    def _tok(self) -> Any:
        return self.engine.tokenizer

    def render_prompt(self, prompt: str, messages: list[dict[str, Any]] | None,
                      chat: bool) -> tuple[str, bool]:
        """The prompt as text in this model's format; True if it is a rendered template."""
        turns = messages or ([{"role": "user", "content": prompt}] if chat else None)
        if not turns:
            return prompt, False
        if not getattr(self._tok, "chat_template", None):
            return "".join(f"{m['role']}: {m['content']}\n" for m in turns) + "assistant:", False
        return self._tok.apply_chat_template(turns, add_generation_prompt=True,
                                             tokenize=False), True

    def _encode(self, text: str, templated: bool) -> list[int]:
        if templated:   # the rendered template carries its own special tokens
            return list(self._tok.encode(text, add_special_tokens=False))
        return self.engine.encode(text)

    def _session(self, session: str) -> Session:
        s = self.engine._sessions.get(session)
        if s is None or len(s.token_logp) != len(s.tokens):
            raise KeyError(f"unknown text session {session}")
        s.last_used = time.monotonic()
        return s

    def open(self, session: str, text: str, templated: bool) -> TextLogp:
        """Start (or, for a kept conversation, re-sync) a text session on `text`."""
        t0 = time.perf_counter()
        if not text:
            raise ValueError("empty prompt")
        eng = self.engine
        s = eng._sessions.get(session)
        if s is None or len(s.token_logp) != len(s.tokens) or not eng.backend.trimmable(s.cache):
            eng._drop(session)
            s = eng._new_session(session)
        s.active, s.templated, s.text = True, templated, text
        self.interrupted.discard(session)
        self._advance(s, self._encode(text, templated))
        return TextLogp(sum(s.token_logp), utf8_len(text), (time.perf_counter() - t0) * 1000.0)

    def tokens(self, session: str) -> tuple[list[int], list[float]]:
        """The session's ids (this tokenizer's canonical encoding of its text) and every id's
        exact log p given the ids before it (0 for a first id nothing predicts)."""
        s = self._session(session)
        return list(s.tokens), list(s.token_logp)

    def extend(self, session: str, piece: str) -> TextLogp:
        """Append committed text; return its exact log p under this model."""
        t0 = time.perf_counter()
        s = self._session(session)
        s.text += piece
        logp = self._advance(s, self._encode(s.text, s.templated))
        return TextLogp(logp, utf8_len(piece), (time.perf_counter() - t0) * 1000.0)

    def _advance(self, s: Session, ids: list[int]) -> float:
        """Make the cache hold `ids`; return log P(ids) - log P(the ids it held)."""
        backend = self.engine.backend
        old, lps = s.tokens, s.token_logp
        common = common_prefix(old, ids)
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
        backend.trim(s.cache, len(old) - keep)
        s.tokens, s.token_logp = old[:keep], lps[:keep]     # what the cache holds now
        new = [max(first, LOGP_FLOOR)]
        pos = keep
        while pos < len(ids):
            chunk = ids[pos:pos + PREFILL_STEP]
            s.logprobs, got = backend.forward(s.cache, chunk, ids[pos + 1:pos + 1 + len(chunk)])
            new.extend(max(float(v), LOGP_FLOOR) for v in got)
            pos += len(chunk)
        s.tokens, s.token_logp = list(ids), lps[:keep] + new
        return sum(new[common - keep:]) - removed

    def _eos_logp(self, logprobs: np.ndarray) -> float:
        """log p(any end-of-text id)."""
        if not self.engine.eos_ids:
            return LOGP_FLOOR
        lp = logprobs[sorted(self.engine.eos_ids)].astype(np.float64)
        return float(np.logaddexp.reduce(lp))

    def _decode_tail(self, context: list[int], base: str, ids: list[int]) -> str:
        """The text `ids` add after `context` (whose decoding is `base`)."""
        whole = self._tok.decode(context + ids, clean_up_tokenization_spaces=False)
        if whole.startswith(base):
            return whole[len(base):]
        return self._tok.decode(ids, clean_up_tokenization_spaces=False)

    def propose(self, session: str, max_tokens: int, temperature: float = 0.0,
                seed: list[int] | None = None, whole: bool = False,
                stop: tuple[str, ...] | list[str] = ()) -> Proposed:
        """Generate up to max_tokens from the session's text, cut at a word or line
        boundary (textcut.proposal_cut); the cache is trimmed back afterwards. With
        `whole` (select mode), the whole answer instead: up to max_tokens, an end of
        text or the first stop string (kept: the leader cuts there).

        A proposal holds at least one whole character (or ends the answer): when the
        budget ends inside one (byte tokens of a multi-byte character), generation runs
        on for up to `UTF8_TAIL_TOKENS` more to complete it, and keeps what could not be
        decoded as U+FFFD rather than propose nothing (a round where every member
        proposes nothing cannot go on)."""
        t0 = time.perf_counter()
        if max_tokens <= 0:
            return Proposed("", False, 0, 0.0)
        s = self._session(session)
        backend, eos_ids = self.engine.backend, self.engine.eos_ids
        context = s.tokens[-DECODE_CONTEXT:]
        base = self._tok.decode(context, clean_up_tokenization_spaces=False)
        rng = np.random.default_rng(seed or [0]) if temperature > 0 else None
        logprobs, gen, fed, eos, text, stopped = s.logprobs, [], 0, False, "", False
        try:
            while len(gen) < max_tokens + UTF8_TAIL_TOKENS:
                if session in self.interrupted:
                    break
                if rng is None:
                    tok = int(np.argmax(logprobs))
                else:
                    x = logprobs.astype(np.float64) / temperature
                    p = np.exp(x - x.max())
                    tok = int(rng.choice(len(p), p=p / p.sum()))
                if tok in eos_ids:
                    eos = True
                    break
                gen.append(tok)
                piece_at = len(text)
                text = self._decode_tail(context, base, gen)
                if whole:       # (the leader cuts at the stop string: one rule, one place)
                    if stop and stop_at(text, max(len(text) - piece_at, 1), stop) is not None:
                        stopped = True
                        break
                elif proposal_cut(text, done=False) is not None:
                    break
                if len(gen) >= max_tokens and complete_text(text):
                    break
                logprobs, _ = backend.forward(s.cache, [tok])
                fed += 1
        finally:
            backend.trim(s.cache, fed)
        if not stopped:
            text = complete_text(text) or text     # (nothing whole: keep the U+FFFD)
        if not eos and not whole:
            text = text[:proposal_cut(text, done=True) or 0]
        return Proposed(text, eos, len(gen), (time.perf_counter() - t0) * 1000.0)

    def score(self, session: str, texts: list[str], eos: list[bool]) -> list[float]:
        """Each candidate's NLL as a continuation of the session's text, exactly:
        -(log P(ids(text + c)) - log P(ids(text))) [- log P(EOS) after it], in one batched
        evaluation (`Backend.score`) that leaves the session's cache as it was."""
        s = self._session(session)
        fulls = [self._encode(s.text + t, s.templated) for t in texts]
        commons = [common_prefix(s.tokens, f) for f in fulls]
        keep = max(min(commons) - 1, 0)
        rows = [f[keep:] for f in fulls]
        backend = self.engine.backend
        if len(rows) * max(len(r) for r in rows) <= SCORE_BATCH_TOKENS:
            scored = backend.score(s.cache, len(s.tokens), keep, rows)
        else:       # whole answers (select): one row at a time keeps the logits small
            scored = [backend.score(s.cache, len(s.tokens), keep, [r])[0] for r in rows]
        out = []
        for (got, last), full, common, ends in zip(scored, fulls, commons, eos):
            got = np.maximum(got.astype(np.float64), LOGP_FLOOR)
            start = max(common, 1) - keep - 1              # got[j] is log p(full[keep+j+1])
            nll = -got[start:len(full) - keep - 1].sum() + sum(s.token_logp[common:])
            out.append(float(nll - (max(self._eos_logp(last), LOGP_FLOOR) if ends else 0.0)))
        return out

    def topk(self, session: str, k: int) -> TextTopKOut:
        """The next piece's top-k as the strings the tokens add to the text (EOS apart)."""
        t0 = time.perf_counter()
        s = self._session(session)
        ids, _, _ = top_k(s.logprobs, k)
        lps = s.logprobs[ids.astype(np.int64)].astype(np.float64)
        eos_logp = self._eos_logp(s.logprobs)
        special = set(getattr(self._tok, "all_special_ids", []) or []) | self.engine.eos_ids
        context = s.tokens[-DECODE_CONTEXT:]
        base = self._tok.decode(context, clean_up_tokenization_spaces=False)
        probs: dict[str, float] = {}
        for tok, lp in zip(ids.tolist(), lps):
            piece = "" if tok in special else self._decode_tail(context, base, [tok])
            if piece and "\ufffd" not in piece:    # incomplete characters are left out
                probs[piece] = probs.get(piece, 0.0) + float(np.exp(lp))
        rest = 1.0 - sum(probs.values()) - float(np.exp(eos_logp))
        return TextTopKOut(list(probs), np.log(np.array(list(probs.values()))).astype(np.float16),
                           max(eos_logp, LOGP_FLOOR), min(max(rest, 0.0), 1.0),
                           (time.perf_counter() - t0) * 1000.0)
