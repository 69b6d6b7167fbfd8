"""The llama.cpp backend: a GGUF file run as it is (quantized weights, llama.cpp's CPU
kernels) through llama-cpp-python's low-level API; the engine for CPU-only machines.

One llama.cpp context serves every session: a session's cache is a KV-cache sequence
(`seq_id`) in one unified KV buffer of `LLAMA_CONTEXT` cells shared by all sequences.
Trimming is `llama_memory_seq_rm` from a position on; scoring copies the kept prefix into
scratch sequences (cells are shared, nothing is copied) and evaluates every candidate in
one batch. Sliding-window models (gemma-3) get a full-size window cache (`swa_full`), so
any prefix can be trimmed back to, as with every other model.

The tokenizer is the GGUF's own: built from its metadata by `gguf_tokenizer` exactly as
the mlx import builds it, and run by `engine.tokenizer` without transformers (so both
engines' fingerprints, ids and texts agree; tests check it against llama.cpp's
tokenization and against mlx-lm's loader). Owns llama.cpp calls only.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dwarfmesh.engine.backend import Loaded
from dwarfmesh.engine.kv import MAX_SESSIONS, PREFILL_STEP, log_softmax

log = logging.getLogger(__name__)

LLAMA_CONTEXT = 8192        # KV cells shared by all sessions of one node
SCRATCH_SEQS = 8            # sequences `score` evaluates candidates on, in one batch
OUTPUT_FLOATS = 1 << 24     # logits one forward may return (64 MB): bounds rows x vocab


def physical_cores() -> int:
    """Physical cores this process may run on (llama.cpp gains nothing from SMT twins)."""
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:                        # not Linux
        return max((os.cpu_count() or 2) // 2, 1)
    cores: set[tuple[str, str]] = set()
    cpu = phys = None
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "processor":
                    cpu, phys = int(value), "0"
                elif key == "physical id":
                    phys = value
                elif key == "core id" and cpu in allowed:
                    cores.add((phys or "0", value))
    except (OSError, ValueError):
        cores = set()
    return max(len(cores) or len(allowed), 1)


_LOG_CALLBACK: Any = None      # held here: llama.cpp keeps only the C pointer


def _log_callback(lc: Any) -> Any:
    """llama.cpp's log lines into this module's logger at debug level (it prints a screen
    of model details on every load, and warnings such as a context longer than trained,
    which is by design here: the KV buffer is shared by all sessions)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        @lc.llama_log_callback
        def forward(level: int, text: bytes, user_data: Any) -> None:
            line = text.decode("utf-8", "replace").rstrip()
            if line:
                log.debug("llama.cpp: %s", line)
        _LOG_CALLBACK = forward
    return _LOG_CALLBACK


@dataclass
class Seq:
    """A session's KV cache: a sequence id and how many positions it holds."""

    seq: int
    n: int = 0


class LlamaCppBackend:
    """One GGUF in one llama.cpp context; caches are sequences of its KV buffer."""

    name = "llamacpp"

    def __init__(self, gguf: str | Path, tokenizer_dir: str | Path, eos_ids: list[int], *,
                 threads: int | None = None, n_ctx: int = LLAMA_CONTEXT,
                 repack: bool = True) -> None:
        self.gguf, self.tokenizer_dir = Path(gguf), Path(tokenizer_dir)
        self.eos_ids = list(eos_ids)
        self.threads = threads or physical_cores()
        self.repack = repack
        self.n_ctx_wanted = n_ctx
        self._free = list(range(MAX_SESSIONS - 1, -1, -1))
        self._lc: Any = None
        self.model = self.ctx = self.mem = self.batch = None
        self.n_vocab = 0

    def load(self) -> Loaded:
        # libgomp's default wait policy is left as it is (a bounded spin, throttled when
        # threads outnumber cores): between the hundreds of small operations of one
        # forward its threads must not sleep. PASSIVE made every forward 20-40% slower
        # (SmolLM2-135M 44 vs 62 tok/s, Qwen2.5-Coder-0.5B 17 vs 20, bench/omp_policy.py),
        # and an unbounded spin (ACTIVE) takes the core from the event loop after each
        # decode (hand-off 1.4-1.9 ms a token against 0.9-1.1). Several nodes sharing
        # one machine's cores should run with OMP_WAIT_POLICY=PASSIVE (the tests and the
        # benches set it): there one node's spinning threads slow the others down.
        try:
            import llama_cpp as lc
        except ImportError as e:
            raise ValueError(f"llama-cpp-python is not installed ({e}); run scripts/setup "
                             "or use --engine mlx") from None
        from dwarfmesh.engine.tokenizer import GGUFTokenizer

        lc.llama_log_set(_log_callback(lc), ctypes.c_void_p(0))
        self._lc = lc
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        # Repacked weights (llama.cpp's default) use other kernels for one token than for
        # several: a drafted or caught-up forward's log-probs differ from one token at a
        # time (up to 0.9 nats measured here), so near-ties can go the other way.
        mparams.use_extra_bufts = self.repack
        model = lc.llama_model_load_from_file(str(self.gguf).encode(), mparams)
        if not model:
            raise ValueError(f"llama.cpp cannot load {self.gguf}")
        self.model = model
        n_train = int(lc.llama_model_n_ctx_train(model)) or self.n_ctx_wanted
        self.n_vocab = int(lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model)))
        self.out_rows = max(32, min(PREFILL_STEP, OUTPUT_FLOATS // self.n_vocab))
        cp = lc.llama_context_default_params()
        cp.n_ctx = min(n_train * (MAX_SESSIONS + SCRATCH_SEQS), self.n_ctx_wanted)
        cp.n_batch = cp.n_ubatch = PREFILL_STEP
        cp.n_seq_max = MAX_SESSIONS + SCRATCH_SEQS
        cp.n_threads = cp.n_threads_batch = self.threads
        cp.kv_unified = True        # sessions and scratch share cells: copies are free
        cp.swa_full = True          # a sliding window keeps every position: trimmable
        ctx = lc.llama_init_from_model(model, cp)
        if not ctx:
            raise ValueError(f"llama.cpp cannot make a context for {self.gguf}")
        self.ctx, self.mem = ctx, lc.llama_get_memory(ctx)
        self.batch = lc.llama_batch_init(PREFILL_STEP, 0, 1)
        self.context_length = min(n_train, int(lc.llama_n_ctx(ctx)))
        tokenizer = GGUFTokenizer(self.tokenizer_dir, self.eos_ids)
        swa = int(lc.llama_model_n_swa(model))
        detail = (f"llama.cpp {getattr(lc, '__version__', '?')}, {self.threads} threads, "
                  f"{'' if self.repack else 'weights not repacked, '}{self.gguf.name}"
                  + (f", sliding window {swa} kept in full" if swa else ""))
        return Loaded(tokenizer, self.n_vocab, self.context_length, detail)

    # --- caches ---------------------------------------------------------------------

    def new_cache(self) -> Seq:
        if not self._free:
            raise RuntimeError("every llama.cpp sequence is in use")
        return Seq(self._free.pop())

    def free(self, cache: Seq) -> None:
        self._lc.llama_memory_seq_rm(self.mem, cache.seq, -1, -1)
        cache.n = 0
        self._free.append(cache.seq)

    def trimmable(self, cache: Seq) -> bool:
        return True

    def trim(self, cache: Seq, n: int) -> None:
        if not n:
            return
        keep = cache.n - n
        if keep < 0 or not self._lc.llama_memory_seq_rm(self.mem, cache.seq, keep, -1):
            raise ValueError(f"llama.cpp cannot trim sequence {cache.seq} to {keep} tokens")
        cache.n = keep

    def release(self) -> None:
        pass                    # the KV buffer is allocated once, for the context's life

    def close(self) -> None:
        """Free the context and the model (the engine has stopped)."""
        lc = self._lc
        if lc is None or self.ctx is None:
            return
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)
        self.ctx = self.model = self.mem = None

    # --- evaluation -----------------------------------------------------------------

    def _decode(self, rows: list[tuple[Seq, list[int], int]]) -> np.ndarray:
        """One llama_decode of (cache, ids, lead) rows: every row's ids appended to its
        sequence, logits kept for its first `lead` positions and its last one. Returns
        those logits in order (a view of llama.cpp's buffer, valid until the next decode)."""
        b = self.batch
        i = 0
        n_out = 0
        for cache, ids, lead in rows:
            for j, tok in enumerate(ids):
                b.token[i] = tok
                b.pos[i] = cache.n + j
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = cache.seq
                b.logits[i] = j < lead or j == len(ids) - 1
                n_out += b.logits[i]
                i += 1
        b.n_tokens = i
        rc = self._lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise ValueError(f"llama.cpp could not evaluate {i} tokens (code {rc}): the "
                             f"context of {LLAMA_CONTEXT} tokens shared by all sessions is full"
                             if rc == 1 else f"llama.cpp decode failed (code {rc})")
        for cache, ids, _ in rows:
            cache.n += len(ids)
        ptr = self._lc.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                     shape=(n_out, self.n_vocab))

    def forward(self, cache: Seq, ids: list[int],
                targets: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        targets = targets or []
        got: list[np.ndarray] = []
        pos, last = 0, None
        while pos < len(ids):
            # chunks small enough that every wanted row of logits fits OUTPUT_FLOATS
            step = self.out_rows if pos < len(targets) else PREFILL_STEP
            chunk = ids[pos:pos + step]
            want = max(min(len(targets) - pos, len(chunk)), 0)
            logits = self._decode([(cache, chunk, want)])
            if want:
                got.append(_target_logps(logits[:want], targets[pos:pos + want]))
            last = logits[-1]
            pos += len(chunk)
        return log_softmax(last), (np.concatenate(got) if got else np.zeros(0, np.float32))

    def forward_all(self, cache: Seq, ids: list[int]) -> np.ndarray:
        if not ids or len(ids) > self.out_rows:
            raise ValueError(f"forward_all takes 1 to {self.out_rows} ids, not {len(ids)}")
        return log_softmax(self._decode([(cache, ids, len(ids))]))

    def score(self, cache: Seq, held: int, keep: int,
              rows: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        out: list[tuple[np.ndarray, np.ndarray]] = []
        lc = self._lc
        for start in range(0, len(rows), SCRATCH_SEQS):
            group = rows[start:start + SCRATCH_SEQS]
            scratch = [Seq(MAX_SESSIONS + j, keep) for j in range(len(group))]
            try:
                for s in scratch:
                    lc.llama_memory_seq_cp(self.mem, cache.seq, s.seq, 0, keep)
                if sum(len(r) for r in group) <= PREFILL_STEP and \
                        sum(len(r) for r in group) * self.n_vocab <= OUTPUT_FLOATS:
                    logits = self._decode([(s, r, len(r)) for s, r in zip(scratch, group)])
                    at = 0
                    for r in group:
                        part = logits[at:at + len(r)]
                        out.append((_target_logps(part[:-1], r[1:]), log_softmax(part[-1])))
                        at += len(r)
                else:                       # too long for one batch: one row at a time
                    for s, r in zip(scratch, group):
                        last, got = self.forward(s, r, r[1:])
                        out.append((got, last))
            finally:
                for s in scratch:
                    lc.llama_memory_seq_rm(self.mem, s.seq, -1, -1)
        return out


def _target_logps(logits: np.ndarray, targets: list[int]) -> np.ndarray:
    """log p(targets[i]) under row i of raw logits."""
    if not len(targets):
        return np.zeros(0, np.float32)
    x = logits[:len(targets)].astype(np.float32)
    m = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=-1, dtype=np.float64)).astype(np.float32) + m[:, 0]
    return x[np.arange(len(targets)), targets] - lse
