"""The engine: the one thread that owns a backend, and the table of sessions on it.

Every model call of a node happens on the engine's single worker thread (mlx streams are
thread-local; a llama.cpp context is not safe to drive from two threads). The asyncio
side calls `await engine.open(...)` / `step(...)` / `close(...)`; the call is queued to
that thread (`open` and `step` at once, the others when awaited) and its result (or
exception) comes back with one `loop.call_soon_threadsafe`.

Per session the engine keeps the backend's KV cache, the log-probabilities of the next
token (to report the exact log p of whichever token the leader commits, even outside the
top-k), and the ids processed. Text-level sessions are `engine.text.TextSessions`', on
the same thread and table. The engine knows nothing about the network, fusion or who
leads; which library computes the numbers is the backend's business (`engine.backend`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dwarfmesh.config import MAX_DRAFT
from dwarfmesh.engine.backend import Backend, tokenizer_fingerprint
from dwarfmesh.engine.kv import (
    LOGP_FLOOR,
    MAX_SESSIONS,
    PREFILL_STEP,
    SESSION_IDLE_S,
    Session,
    common_prefix,
    top_k,
)
from dwarfmesh.engine.text import TextSessions

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
    # a speculative round: the draft appended after the committed ids, the exact log p of
    # each drafted id, and the top-k (ids, log-probs, rest mass) after each drafted id
    draft: tuple[int, ...] = ()
    draft_logp: tuple[float, ...] = ()
    more: tuple[tuple[np.ndarray, np.ndarray, float], ...] = ()


def _settle(fut: asyncio.Future, ok: bool, value: Any) -> None:
    if fut.cancelled():
        return
    if ok:
        fut.set_result(value)
    else:
        fut.set_exception(value)


class ModelThread:
    """The one thread every model call runs on, fed by a queue. Engines may share one
    (in-process tests of several nodes: mlx wants one thread)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.closed = False

    def _serve(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            loop, fut, fn, args = job
            try:
                ok, value = True, fn(*args)
            except BaseException as exc:  # noqa: BLE001  (errors travel back as values)
                ok, value = False, exc
            try:
                loop.call_soon_threadsafe(_settle, fut, ok, value)
            except RuntimeError:            # the loop has closed: nobody is waiting
                pass

    def submit(self, fn, *args) -> asyncio.Future:
        """Queue `fn(*args)` now; the future settles on the caller's loop when it ran."""
        if self.closed:
            raise RuntimeError("the engine is shut down")
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="engine", daemon=True)
            self._thread.start()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._jobs.put((loop, fut, fn, args))
        return fut

    async def run(self, fn, *args):
        return await self.submit(fn, *args)

    def stop(self, wait: bool) -> None:
        self.closed = True
        if self._thread is not None:
            self._jobs.put(None)
            if wait and self._thread is not threading.current_thread():
                self._thread.join()


class Engine:
    """Serves top-k frames for many sessions from one backend, on one thread."""

    def __init__(self, model_path: str | Path | None = None, *, model_name: str | None = None,
                 backend: Backend | None = None) -> None:
        if backend is None:
            from dwarfmesh.engine.mlx_backend import MlxBackend
            backend = MlxBackend(model_path)
        self.backend = backend
        self.model_path = str(model_path or "")
        self.model_name = model_name or Path(self.model_path).name or backend.name
        self._sessions: dict[str, Session] = {}
        self._pool = ModelThread()
        self.text = TextSessions(self)
        self.tokenizer: Any = None
        self.vocab_size = 0
        self.fingerprint = ""
        self.eos_ids: set[int] = set()
        self.context_length: int | None = None

    @property
    def engine_name(self) -> str:
        return self.backend.name

    @property
    def model(self) -> Any:
        """The backend's model object (an mlx-lm Module on mlx: the quality bench drives it
        directly, off the engine thread, with no session open)."""
        return getattr(self.backend, "model", None)

    # --- asyncio side -------------------------------------------------------------------

    async def _run(self, fn, *args):
        return await self._pool.run(fn, *args)

    async def load(self) -> None:
        await self._run(self.load_sync)

    # open and step are queued when called, not when first awaited: a leader asks for its
    # own frame first and then sends the Token to its members and origin, and the model
    # thread computes meanwhile (the send is not on the forward's critical path).

    def open(self, session: str, prompt_ids: list[int] | np.ndarray,
             k: int) -> asyncio.Future[StepOut]:
        return self._pool.submit(self.open_sync, session, prompt_ids, k)

    def step(self, session: str, token_ids: int | list[int], k: int,
             draft: list[int] | None = None, self_draft: int = 0) -> asyncio.Future[StepOut]:
        return self._pool.submit(self.step_sync, session, token_ids, k, draft, self_draft)

    async def close(self, session: str, keep: bool = False) -> None:
        await self._run(self.close_sync, session, keep)

    async def sweep(self, idle_s: float = SESSION_IDLE_S) -> list[str]:
        return await self._run(self.sweep_sync, idle_s)

    def shutdown(self, wait: bool = True) -> None:
        """Stop taking work; with wait, also let the model thread finish and exit."""
        self._pool.stop(wait)
        if not wait:
            return
        close = getattr(self.backend, "close", None)
        if close is not None:           # nothing runs on the model any more
            close()

    # --- model thread -------------------------------------------------------------------

    def load_sync(self) -> None:
        t0 = time.perf_counter()
        info = self.backend.load()
        self.tokenizer = info.tokenizer
        self.vocab_size = info.vocab_size
        self.context_length = info.context_length
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.eos_ids = set(int(i) for i in self.tokenizer.eos_token_ids)
        log.info("loaded %s on %s in %.1fs (vocab %d, tokenizer %s%s)", self.model_name,
                 self.backend.name, time.perf_counter() - t0, self.vocab_size,
                 self.fingerprint[:8], f"; {info.detail}" if info.detail else "")

    def _new_session(self, session: str) -> Session:
        self._make_room(session)
        s = Session(self.backend.new_cache(), None, [], True, time.monotonic())
        self._sessions[session] = s
        return s

    def _drop(self, session: str) -> None:
        s = self._sessions.pop(session, None)
        if s is not None:
            self.backend.free(s.cache)

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
        if not all(0 <= t < self.vocab_size for t in new_ids):
            raise ValueError("prompt ids outside the vocabulary")
        s = self._sessions.get(session)
        reuse = 0
        if s is not None and self.backend.trimmable(s.cache):
            reuse = min(common_prefix(s.tokens, new_ids), n - 1)   # one token makes logits
            self.backend.trim(s.cache, len(s.tokens) - reuse)
            s.tokens, s.token_logp, s.active = s.tokens[:reuse], [], True
            s.draft, s.draft_logprobs = 0, []
        else:
            self._drop(session)
            s = self._new_session(session)
        nll_sum, done = 0.0, reuse
        try:
            # Like mlx-lm's generate_step: all but the last token in chunks, then the last
            # one, so a one-member mesh computes exactly what mlx-lm computes.
            while n - done > 1:
                m = min(PREFILL_STEP, n - done - 1)
                _, got = self.backend.forward(s.cache, new_ids[done:done + m],
                                              new_ids[done + 1:done + m + 1])
                nll_sum -= float(got.astype(np.float64).sum())
                done += m
            s.logprobs, _ = self.backend.forward(s.cache, new_ids[done:])
        except BaseException:
            self._drop(session)             # a half-filled cache is of no use to anyone
            raise
        s.tokens, s.last_used = new_ids, time.monotonic()
        ids, lps, rest = top_k(s.logprobs, k)
        scored = n - 1 - reuse
        return StepOut(ids, lps, rest, None, nll_sum / scored if scored > 0 else None,
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
        self._drop(oldest)

    def step_sync(self, session: str, token_ids: int | list[int], k: int,
                  draft: list[int] | None = None, self_draft: int = 0) -> StepOut:
        """Append committed token(s); return the last one's exact log p and the next frame.

        Several tokens at once is how a member that fell behind catches up, and how a
        speculative round commits: one forward over all of them, one frame for the
        newest step. With a `draft`, the drafted ids are appended in the same forward and
        the frame also holds the top-k after each of them; the next call keeps the
        drafted ids it commits (their log-probs are known) and trims the rest.

        With `self_draft` = n (and no draft) this model drafts: after the committed ids it
        appends its own greedy choice n times (up to an end-of-sequence id), one forward
        each, and the frame holds the same as for a draft it was given. Those are the
        frames it would send committing its choices one token a round, computed the same
        way, so a member's drafted positions are exact.
        """
        t0 = time.perf_counter()
        s = self._sessions.get(session)
        if s is None or s.logprobs is None:
            raise KeyError(f"unknown session {session}")
        toks = [token_ids] if isinstance(token_ids, int) else [int(t) for t in token_ids]
        draft = [int(t) for t in draft or ()]
        if not toks or not all(0 <= t < self.vocab_size for t in toks + draft):
            raise ValueError(f"token ids {toks} {draft} outside the vocabulary")
        prev_logp, toks = self._settle_draft(s, toks)
        if (draft or self_draft) and not self.backend.trimmable(s.cache):
            draft, self_draft = [], 0   # a cache that cannot drop them takes no drafts
        if len(toks) > 1 or (toks and not draft):
            # the committed ids this forward appends (all of them without a draft)
            feed = toks[:-1] if draft else toks
            if len(feed) == 1:
                prev_logp = float(s.logprobs[feed[0]])
                s.logprobs, _ = self.backend.forward(s.cache, feed)
            else:
                s.logprobs, got = self.backend.forward(s.cache, feed, feed[1:])
                prev_logp = float(got[-1])
            s.tokens.extend(feed)
            toks = toks[len(feed):]
        more: list[tuple[np.ndarray, np.ndarray, float]] = []
        draft_logp: list[float] = []
        if draft:
            rows = self.backend.forward_all(s.cache, toks + draft)
            if toks:                          # the round's last committed id
                prev_logp = float(s.logprobs[toks[0]])
                s.logprobs = rows[0]
                rows = rows[1:]
            before = s.logprobs
            for d, after in zip(draft, rows):
                draft_logp.append(max(float(before[d]), LOGP_FLOOR))
                more.append(top_k(after, k))
                before = after
            s.tokens.extend(toks + draft)
            s.draft, s.draft_logprobs = len(draft), [s.logprobs, *rows]
        elif self_draft > 0:
            draft, draft_logp, more = self._draft_greedily(s, min(self_draft, MAX_DRAFT), k)
        s.last_used = time.monotonic()
        ids, lps, rest = top_k(s.logprobs, k)
        return StepOut(ids, lps, rest, max(prev_logp, LOGP_FLOOR), None,
                       (time.perf_counter() - t0) * 1000.0, len(s.tokens) - s.draft,
                       draft=tuple(draft), draft_logp=tuple(draft_logp), more=tuple(more))

    def _draft_greedily(self, s: Any, n: int, k: int) -> tuple[
            list[int], list[float], list[tuple[np.ndarray, np.ndarray, float]]]:
        """Append this model's greedy choice n times (stopping after an end-of-sequence
        id), one forward each, as a pending draft; return the drafted ids, the log p of
        each and the top-k after each."""
        rows: list[np.ndarray] = []
        draft: list[int] = []
        draft_logp: list[float] = []
        more: list[tuple[np.ndarray, np.ndarray, float]] = []
        before = s.logprobs
        while len(draft) < n:
            d = int(np.argmax(before))
            after, _ = self.backend.forward(s.cache, [d])
            draft.append(d)
            draft_logp.append(max(float(before[d]), LOGP_FLOOR))
            more.append(top_k(after, k))
            rows.append(after)
            before = after
            if d in self.eos_ids:
                break
        s.tokens.extend(draft)
        s.draft, s.draft_logprobs = len(draft), [s.logprobs, *rows]
        return draft, draft_logp, more

    def _settle_draft(self, s: Any, toks: list[int]) -> tuple[float, list[int]]:
        """Committed `toks` against the session's pending draft: keep the drafted ids they
        commit (their log-probs are known), trim the others. Returns the exact log p of
        the last kept one (nan when none) and the ids still to append."""
        if not s.draft:
            return float("nan"), toks
        pending = s.tokens[len(s.tokens) - s.draft:]
        kept = common_prefix(toks, pending)
        drop = s.draft - kept
        if drop:
            self.backend.trim(s.cache, drop)
            del s.tokens[len(s.tokens) - drop:]
        dists = s.draft_logprobs
        prev = float(dists[kept - 1][pending[kept - 1]]) if kept else float("nan")
        s.logprobs = dists[kept]
        s.draft, s.draft_logprobs = 0, []
        return prev, toks[kept:]

    def close_sync(self, session: str, keep: bool = False) -> None:
        """End a session's turn: free its cache, or keep it (idle) for the next turn."""
        self.text.interrupted.discard(session)      # its whole answer, if any, is over
        s = self._sessions.get(session)
        if s is None:
            return
        if keep:
            s.active, s.last_used = False, time.monotonic()
            return
        self._drop(session)
        if not self._sessions:
            self.backend.release()

    def sweep_sync(self, idle_s: float = SESSION_IDLE_S) -> list[str]:
        """Free kept conversation caches idle for longer than idle_s; return their ids."""
        now = time.monotonic()
        old = [k for k, v in self._sessions.items() if not v.active and now - v.last_used > idle_s]
        for key in old:
            self._drop(key)
        if old and not self._sessions:
            self.backend.release()
        return old

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    # --- text (thread-safe: the HF fast tokenizer is Rust and touches no model) ---------

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

    # --- text-level sessions: `TextSessions` does the work, on this engine's thread -----

    def render_prompt(self, prompt: str, messages: list[dict[str, Any]] | None,
                      chat: bool) -> tuple[str, bool]:
        return self.text.render_prompt(prompt, messages, chat)

    async def text_open(self, session: str, text: str, templated: bool):
        return await self._run(self.text_open_sync, session, text, templated)

    async def text_extend(self, session: str, piece: str):
        return await self._run(self.text_extend_sync, session, piece)

    async def propose(self, session: str, max_tokens: int, temperature: float = 0.0,
                      seed: list[int] | None = None, whole: bool = False,
                      stop: list[str] | tuple[str, ...] = ()):
        return await self._run(self.propose_sync, session, max_tokens, temperature, seed,
                               whole, stop)

    async def score(self, session: str, texts: list[str], eos: list[bool]) -> list[float]:
        return await self._run(self.score_sync, session, texts, eos)

    async def text_topk(self, session: str, k: int):
        return await self._run(self.text_topk_sync, session, k)

    def text_open_sync(self, session: str, text: str, templated: bool):
        return self.text.open(session, text, templated)

    def text_extend_sync(self, session: str, piece: str):
        return self.text.extend(session, piece)

    def text_tokens_sync(self, session: str) -> tuple[list[int], list[float]]:
        return self.text.tokens(session)

    def propose_sync(self, session: str, max_tokens: int, temperature: float = 0.0,
                     seed: list[int] | None = None, whole: bool = False,
                     stop: list[str] | tuple[str, ...] = ()):
        return self.text.propose(session, max_tokens, temperature, seed, whole, stop)

    def score_sync(self, session: str, texts: list[str], eos: list[bool]) -> list[float]:
        return self.text.score(session, texts, eos)

    def text_topk_sync(self, session: str, k: int):
        return self.text.topk(session, k)
