"""Independent references the tests compare the mesh and the engines against.

`Direct(path)` is one mlx-lm model computed from scratch on whole texts (full forward
passes, no KV cache): log-probs, NLLs, greedy proposals and top-k pieces of text.
`direct_topk_frames(model, ids, k)` gives each step's top-k and rest mass straight from a
model with mlx-lm's own KV cache. `REFERENCE` is llama.cpp's tokenization of a few texts
by the real registry models (tests/data/tokenizer_reference.json).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

import dwarfmesh  # noqa: F401  (OpenBLAS preload before mlx)
from dwarfmesh.engine.text import UTF8_TAIL_TOKENS
from dwarfmesh.fusion import text as tf

REFERENCE = json.loads((Path(__file__).parent / "data" / "tokenizer_reference.json").read_text())


class Direct:
    """One model computed from scratch on whole texts: the independent reference."""

    # How closely a log-prob (logp_abs) and a sum of them (nll_rel, nll_abs) match when
    # the engine computes them another way (trimmed and reused caches, batched
    # candidates): mlx computes in float32.
    nll_rel, nll_abs, logp_abs = 1e-4, 2e-3, 1e-3

    def __init__(self, path: Path) -> None:
        self.model, self.tok = load(str(path))
        self.eos = set(self.tok.eos_token_ids)
        self.vocab_size = self.model.args.vocab_size
        self._prefix: tuple[list[int], list, np.ndarray] | None = None

    def keep_prefix(self, text: str) -> None:
        """Prefill `text` once into a fresh cache of mlx-lm's own making: a `cached`
        proposal whose context's ids start with these continues from a copy of it (the
        same computation as prefilling the whole context, without repeating a long one)."""
        ids = self.tok.encode(text)
        cache = make_prompt_cache(self.model)
        last = np.array(self.model(mx.array([ids]), cache=cache)[0, -1], np.float64)
        self._prefix = (ids, cache, last)

    def logprobs(self, ids: list[int]) -> np.ndarray:
        logits = self.model(mx.array([ids]))[0].astype(mx.float32)
        return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True), dtype=np.float64)

    def nll(self, text: str) -> float:
        ids = self.tok.encode(text)
        lp = self.logprobs(ids)
        return -float(sum(lp[i - 1, ids[i]] for i in range(1, len(ids))))

    def eos_logp(self, text: str) -> float:
        last = self.logprobs(self.tok.encode(text))[-1]
        return float(np.logaddexp.reduce(last[sorted(self.eos)]))

    def continuation_nll(self, context: str, text: str, eos: bool) -> float:
        out = self.nll(context + text) - self.nll(context)
        return out - (self.eos_logp(context + text) if eos else 0.0)

    def proposal(self, context: str, budget: int, cached: bool = False) -> tuple[str, bool]:
        """Greedy continuation from a fresh prefill, cut at a word or line boundary, with
        at least one whole character (up to UTF8_TAIL_TOKENS past the budget to finish
        one; U+FFFD kept if none). Every token is a full forward over everything, or with
        `cached`, one forward of it after a prefill into a fresh cache of mlx-lm's own
        making (never trimmed)."""
        ids, gen, text, eos = self.tok.encode(context), [], "", False
        cache = make_prompt_cache(self.model) if cached else None
        fed, last = 0, None
        if cached and self._prefix is not None and ids[:len(self._prefix[0])] == self._prefix[0]:
            cache, fed, last = copy.deepcopy(self._prefix[1]), len(self._prefix[0]), \
                self._prefix[2]
        while budget > 0 and len(gen) < budget + UTF8_TAIL_TOKENS:
            if cache is None:
                last = self.logprobs(ids + gen)[-1]
            elif fed < len(ids + gen):
                new = (ids + gen)[fed:]
                last = np.array(self.model(mx.array([new]), cache=cache)[0, -1], np.float64)
                fed += len(new)
            tok = int(np.argmax(last))
            if tok in self.eos:
                eos = True
                break
            gen.append(tok)
            text = self.tok.decode(gen)
            if tf.proposal_cut(text, done=False) is not None or (
                    len(gen) >= budget and tf.complete_text(text)):
                break
        text = tf.complete_text(text) or text
        return (text if eos else text[:tf.proposal_cut(text, done=True) or 0]), eos

    def top_texts(self, context: str, k: int) -> tuple[dict[str, float], float, float]:
        """The next piece's top-k as strings, from a fresh prefill (see textfuse doc)."""
        last = self.logprobs(self.tok.encode(context))[-1]
        special = set(self.tok.all_special_ids) | self.eos
        probs: dict[str, float] = {}
        for tok in np.argsort(-last.astype(np.float32), kind="stable")[:k]:
            piece = "" if int(tok) in special else self.tok.decode([int(tok)])
            if piece and "\ufffd" not in piece:
                probs[piece] = probs.get(piece, 0.0) + float(np.exp(last[tok]))
        eos_logp = float(np.logaddexp.reduce(last[sorted(self.eos)]))
        return probs, eos_logp, max(1.0 - sum(probs.values()) - math.exp(eos_logp), 0.0)


class LlamaDirect(Direct):
    """`Direct` on llama.cpp, for a GGUF a node runs there: every query a fresh prefill of
    the whole text (llama-cpp-python's high-level `Llama`, all positions' logits, its KV
    cache cleared first), tokenized by mlx-lm's loader over the tokenizer the engine
    writes for the file (itself checked against llama.cpp's tokenization)."""

    # llama.cpp keeps the KV cache in float16 and its flash attention meets it in float16
    # (2^-11 relative rounding): computed over other batches, a logit moves by ~5e-4 of
    # its size, and the test models' logits reach ~30 (peaked outputs), so a log-prob
    # by up to ~0.015. Summed over a candidate's tokens the roundings of every layer's
    # attention compound: on an AVX-512 CPU (kernels that reduce in another order) a
    # candidate's NLL came out 1.6e-3 of its size from the reference's (0.056 of 34
    # nats), so the bound is 8 float16 units, 2^-8 of the size. A stale or missing
    # cache entry is off by nats per token.
    nll_rel, nll_abs, logp_abs = 2.0 ** -8, 0.05, 0.01

    def __init__(self, gguf: Path) -> None:
        from llama_cpp import Llama
        from mlx_lm.utils import load_tokenizer

        from dwarfmesh.engine.choose import tokenizer_dir

        tok_dir, eos = tokenizer_dir(Path(gguf))
        self.tok = load_tokenizer(tok_dir, eos_token_ids=eos)
        self.eos = set(self.tok.eos_token_ids)
        # flash attention as the engine runs it (its context's default, AUTO, is on for
        # the CPU): without it attention rounds differently, by up to 0.02 nats here
        self.llm = Llama(model_path=str(gguf), n_ctx=2048, n_batch=2048, logits_all=True,
                         flash_attn=True, verbose=False)
        self.vocab_size = self.llm.n_vocab()
        self._prefix = None

    def keep_prefix(self, text: str) -> None:
        raise NotImplementedError("LlamaDirect computes every proposal from scratch")

    def logprobs(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        logits = np.array(self.llm.scores[:len(ids)], dtype=np.float64)
        return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def direct_for(gguf: Path) -> Direct:
    """The from-scratch reference for a GGUF on the engine a node here runs it on
    (`--engine auto`): llama.cpp on a CPU-only machine with llama-cpp-python, else mlx
    on the file's import."""
    from dwarfmesh.engine.choose import choose
    from dwarfmesh.models import registry as models

    if choose("auto", str(gguf))[0] == "llamacpp":
        return LlamaDirect(gguf)
    return Direct(models.resolve_model(str(gguf), pull=True))


def direct_topk_frames(model, ids: list[int], k: int):
    """Each step's top-k (float16) and rest mass straight from the model, with a KV cache."""
    cache = make_prompt_cache(model)
    arr = mx.array(ids, dtype=mx.int32)
    if len(ids) > 1:
        model(arr[None, :-1], cache=cache)
    logits = model(arr[None, -1:], cache=cache)[0, -1].astype(mx.float32)

    def frame(logits):
        lp = np.array(logits - mx.logsumexp(logits), dtype=np.float32)
        top = np.argsort(-lp, kind="stable")[:k]
        rest = max(1.0 - float(np.exp(lp[top].astype(np.float64)).sum()), 0.0)
        return top, lp[top].astype(np.float16), rest

    def step(tok):
        out = model(mx.array([[tok]], dtype=mx.int32), cache=cache)[0, -1].astype(mx.float32)
        return frame(out)

    return frame(logits), step


def engine_greedy(spec: str, prompt: str, max_tokens: int) -> list[int]:
    """The greedy continuation of `prompt` by the engine a node on this machine runs for
    `spec` (`--engine auto`), one token at a time as a node steps: the answer a mesh of
    copies of that one model must reproduce exactly."""
    from dwarfmesh.engine.choose import make_engine

    engine, _ = make_engine(spec, pull=False)
    engine.load_sync()
    try:
        return engine_greedy_with(engine, prompt, max_tokens)
    finally:
        engine.shutdown(wait=True)


def engine_greedy_with(engine, prompt: str, max_tokens: int) -> list[int]:
    """`engine_greedy` on a loaded engine (its end-of-text token included, as mlx-lm's
    stream_generate yields it)."""
    out = engine.open_sync("reference", engine.encode(prompt), 1)
    ids: list[int] = []
    try:
        while len(ids) < max_tokens:
            token = int(out.ids[0])
            ids.append(token)
            if token in engine.eos_ids:
                break
            out = engine.step_sync("reference", token, 1)
        return ids
    finally:
        engine.close_sync("reference")


def fused_greedy(engines, prompt: str, max_tokens: int, k: int) -> list[int]:
    """Greedy ids of an equal-weight linear pool of loaded engines' top-k frames, computed
    here without the mesh (its end-of-text token included)."""
    from dwarfmesh.fusion import pools

    ids = engines[0].encode(prompt)
    frames = [e.open_sync("fused", ids, k) for e in engines]
    out: list[int] = []
    try:
        for _ in range(max_tokens):
            fused = pools.fuse([f.ids for f in frames], [f.logprobs for f in frames],
                                [f.rest_mass for f in frames], np.ones(len(frames)),
                                engines[0].vocab_size, "linear")
            tok = pools.choose(fused, temperature=0.0, top_p=1.0, rng=None)
            out.append(tok)
            if tok in engines[0].eos_ids:
                break
            frames = [e.step_sync("fused", tok, k) for e in engines]
        return out
    finally:
        for e in engines:
            e.close_sync("fused")


CONVERSATIONS = [
    [{"role": "user", "content": "hi there"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Sort [3,1,2] ."},
     {"role": "assistant", "content": "[1, 2, 3]"},
     {"role": "user", "content": "é and 日本 ?"}],
]


def streamed(detok, ids: list[int], *, chat: bool) -> list[str]:
    """The pieces a node streams for `ids` through detokenizer `detok`."""
    from dwarfmesh.sessions.answer import answer_detokenizer

    detok = answer_detokenizer(detok, chat=chat)
    pieces = []
    for t in ids:
        detok.add_token(t)
        pieces.append(detok.last_segment)
    detok.finalize()
    return pieces + [detok.last_segment]


def assert_same_tokenizer(ours, theirs, texts: list[str], seed: int = 0) -> None:
    """`ours` (engine.tokenizer.GGUFTokenizer) behaves as `theirs` (mlx-lm's loader over
    transformers) in everything a node uses: fingerprint, end ids, encoding with and
    without special tokens, decoding, the streamed pieces of an answer and of a chat
    reply, and the chat template rendered and tokenized."""
    import random

    from dwarfmesh.engine.backend import tokenizer_fingerprint

    assert tokenizer_fingerprint(ours) == tokenizer_fingerprint(theirs)
    assert set(ours.eos_token_ids) == set(theirs.eos_token_ids)
    assert ours.bos_token == theirs.bos_token and len(ours) == len(theirs)
    assert ours.all_special_tokens == theirs.all_special_tokens
    rng = random.Random(seed)
    samples = [theirs.encode(t) for t in texts]
    samples += [[rng.randrange(len(theirs)) for _ in range(16)] for _ in range(40)]
    for text in texts:
        for special in (True, False):
            assert ours.encode(text, add_special_tokens=special) == theirs.encode(
                text, add_special_tokens=special), (text, special)
    for ids in samples:
        assert ours.decode(ids) == theirs.decode(ids), ids
        assert ours.decode(ids, clean_up_tokenization_spaces=False) == theirs.decode(
            ids, clean_up_tokenization_spaces=False), ids
        for chat in (True, False):
            assert streamed(ours.detokenizer, ids, chat=chat) == streamed(
                theirs.detokenizer, ids, chat=chat), (ids, chat)
    assert bool(ours.chat_template) == bool(theirs.chat_template)
    if theirs.chat_template:
        for messages in CONVERSATIONS:
            for gen in (True, False):
                assert ours.apply_chat_template(messages, add_generation_prompt=gen,
                                                tokenize=False) == \
                    theirs.apply_chat_template(messages, add_generation_prompt=gen,
                                               tokenize=False)
                assert ours.apply_chat_template(messages, add_generation_prompt=gen) == list(
                    theirs.apply_chat_template(messages, add_generation_prompt=gen))
