"""Held-out bits per byte of each member alone and of the ensemble, exactly as the mesh fuses.

Teacher-forced: every document's prompt is prefilled as context, then each token of the
scored slice is scored given everything before it. BPB = Σ NLL / (ln 2 · scored bytes).

For members that share a tokenizer (one vocabulary, fingerprint-checked as the mesh
does) the ensemble's probability of the actual next token is computed with the mesh's
own pieces, so the figure is the mesh's, not an approximation of it:

- weights: `equal`; `perplexity` = `pools.perplexity_weights` of each member's mean NLL
  on the document's prompt (τ = `config.PERPLEXITY_TAU`); `online` (the mesh default) =
  `pools.OnlineWeights` from that prior with `config.ONLINE_ETA` / `ONLINE_ALPHA`, fed
  each member's exact log p of each actual token, reset per document (one session each);
- full vocabulary (`bpb`): linear pool Σ w_i p_i(t) with each member's exact p_i(t); the
  log-linear pool Σ w_i log p_i(t) − log Z with Z summed over the whole vocabulary;
- top-k frame (`bpb_topk`): what the frames alone give: `pools.fuse` over the members'
  float16 top-k frames (the engine's k, rest mass, uniform floor `member_floor`). A token
  outside every member's top-k gets the floor. The mesh's log-linear pool normalises over
  the candidates only (it chooses among them); here the V − C non-candidates get the
  product of floors too, so that the figure stays finite and a proper distribution.

Members with different tokenizers (`shared_tokenizer: false`) are still scored each
alone as above; their ensemble is the exact mixture over stably cut units of
`bench/quality_text.py` (each member also gets `bpb_text`, the figure it is compared on).

Nothing is tuned: the only constants are the mesh's own. `oracle_per_token_bpb` (the
better member at every token) is a reference ceiling, not something a mesh can do.

Owns the scoring; loads models through `Engine.load_sync` (float32 on the CPU) and does
no other I/O.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

import dwarfmesh  # noqa: F401  (OpenBLAS preload must precede the mlx import)
from bench import quality_text
from bench.texts import Document
from dwarfmesh.config import ONLINE_ALPHA, ONLINE_ETA, PERPLEXITY_TAU
from dwarfmesh.engine import LOGP_FLOOR, Engine
from dwarfmesh.fusion import pools

log = logging.getLogger(__name__)

WINDOW = 256                 # tokens per forward (bounds the [window, vocab] log-probs held)
WEIGHTINGS = ("online", "equal", "perplexity")
POOLS = ("linear", "loglinear")


@dataclass
class _Tokens:
    """Per-token NLL (nats) of every figure, over all documents, and each token's document."""

    doc: list[np.ndarray] = field(default_factory=list)
    nll: dict[str, list[np.ndarray]] = field(default_factory=dict)
    outside: dict[str, list[np.ndarray]] = field(default_factory=dict)

    def add(self, key: str, values: np.ndarray, table: str = "nll") -> None:
        getattr(self, table).setdefault(key, []).append(np.asarray(values, dtype=np.float64))

    def cat(self, key: str, table: str = "nll") -> np.ndarray:
        return np.concatenate(getattr(self, table)[key])


def load_engines(models: dict[str, str]) -> list[Engine]:
    """Load every model (name -> mlx-lm dir) the way a node does."""
    engines = []
    for name, path in models.items():
        e = Engine(path, model_name=name)
        e.load_sync()
        engines.append(e)
    return engines


def _topk(lp: mx.array, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's frame exactly as `Engine._topk` builds it: ids, float16 log-probs, rest."""
    k = min(k, lp.shape[-1])
    idx = mx.argpartition(-lp, kth=k - 1, axis=-1)[:, :k]
    vals = mx.take_along_axis(lp, idx, axis=-1)
    order = mx.argsort(-vals, axis=-1)
    idx, vals = mx.take_along_axis(idx, order, axis=-1), mx.take_along_axis(vals, order, axis=-1)
    ids = np.array(idx, dtype=np.uint32)
    lps = np.array(vals, dtype=np.float32)
    rest = np.clip(1.0 - np.exp(lps.astype(np.float64)).sum(axis=-1), 0.0, 1.0)
    return ids, lps.astype(np.float16), rest


def _member_topk_nll(frame, targets: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """NLL of each target under one member's frame alone (the floor outside its top-k)."""
    ids, lps, rest = frame
    hit = ids == targets[:, None]
    inside = hit.any(axis=1)
    lp_in = np.where(hit, lps.astype(np.float64), 0.0).sum(axis=1)
    floor = np.array([pools.member_floor(r, ids.shape[1], vocab) for r in rest])
    return np.where(inside, -lp_in, -np.log(np.maximum(floor, 1e-300))), ~inside


def _ensemble_topk_nll(frames, targets: np.ndarray, w: np.ndarray, vocab: int,
                       pool: str) -> tuple[float, bool]:
    """NLL of one target (row already chosen in `frames`) under the fused frames."""
    ids, lps, rest = frames
    w = w / w.sum()
    if pool == "linear":
        fused = pools.fuse(ids, lps, rest, w, vocab, "linear")
        j = np.flatnonzero(fused.ids == targets)
        if j.size:
            return -math.log(fused.probs[j[0]]), False
        floor = sum(wi * pools.member_floor(r, len(i), vocab) for wi, r, i in zip(w, rest, ids))
        return -math.log(max(floor, 1e-300)), True
    cands, probs = pools.candidate_matrix(ids, lps, rest, vocab)
    logq = w @ np.log(np.maximum(probs, 1e-300))
    floors = [max(pools.member_floor(r, len(i), vocab), 1e-300) for r, i in zip(rest, ids)]
    log_out = float(w @ np.log(floors))
    n_out = vocab - len(cands)
    terms = np.append(logq, log_out + math.log(n_out)) if n_out > 0 else logq
    log_z = float(np.logaddexp.reduce(terms))
    j = np.flatnonzero(cands == targets)
    return (log_z - logq[j[0]], False) if j.size else (log_z - log_out, True)


def _weights(kind: str, prior: np.ndarray, online: pools.OnlineWeights,
             tl: np.ndarray) -> np.ndarray:
    """[T, N] weights each token is fused with; advances `online` through the tokens."""
    n_tok, n = tl.shape[1], tl.shape[0]
    if kind == "equal":
        return np.full((n_tok, n), 1.0 / n)
    if kind == "perplexity":
        return np.tile(prior, (n_tok, 1))
    out = np.empty((n_tok, n))
    for t in range(n_tok):
        out[t] = online.w
        online.update(np.maximum(tl[:, t], LOGP_FLOOR))   # the mesh clamps prev_logp so too
    return out


@dataclass(frozen=True)
class Tokenized:
    """A document as token ids: the prompt (context) and the scored ids, and their bytes."""

    prompt_ids: list[int]
    text_ids: list[int]
    nbytes: int
    info: dict = field(default_factory=dict)


def tokenize(engine: Engine, doc: Document) -> Tokenized:
    """The prompt exactly as the mesh encodes it; the scored text without special tokens."""
    return Tokenized(list(engine.encode(doc.prompt)),
                     list(engine.tokenizer.encode(doc.text, add_special_tokens=False)),
                     doc.scored_bytes, doc.describe())


def _score_document(engines: list[Engine], doc: Tokenized, k: int, tally: _Tokens,
                    doc_index: int) -> None:
    """Score one document with a group of members that share token ids."""
    first = engines[0]
    prompt_ids, text_ids = doc.prompt_ids, doc.text_ids
    if not prompt_ids or not text_ids:
        raise ValueError("a document needs at least one prompt token and one scored token")
    ids = np.asarray(prompt_ids + text_ids, dtype=np.int32)
    inputs, targets = ids[:-1], ids[1:]
    first_scored = len(prompt_ids) - 1                  # input row predicting text token 0
    names = [e.model_name for e in engines]
    n, vocab = len(engines), first.vocab_size
    caches = [make_prompt_cache(e.model) for e in engines]
    prompt_nll = np.zeros(n)
    online: pools.OnlineWeights | None = None
    prior = np.full(n, 1.0 / n)
    for a in range(0, len(inputs), WINDOW):
        b = min(a + WINDOW, len(inputs))
        s = max(first_scored - a, 0)
        x = mx.array(inputs[a:b][None])
        tgt = mx.array(targets[a:b])
        lps, tl, frames = [], [], []
        for e, cache, i in zip(engines, caches, range(n)):
            logits = e.model(x, cache=cache)[0].astype(mx.float32)
            lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            t_lp = mx.take_along_axis(lp, tgt[:, None], axis=-1)[:, 0]
            mx.eval(lp, t_lp, [c.state for c in cache])
            t_np = np.array(t_lp, dtype=np.float64)
            prompt_nll[i] -= t_np[:s].sum()
            if s < b - a:
                lps.append(lp[s:])
                tl.append(t_np[s:])
                frames.append(_topk(lp[s:], k))
        if not tl:
            continue
        tl_arr = np.stack(tl)                            # [N, T]
        tg = targets[a + s:b].astype(np.int64)
        tally.doc.append(np.full(len(tg), doc_index))
        for name, t_np, frame in zip(names, tl, frames):
            tally.add(f"member/{name}/full", -t_np)
            nll_k, out_k = _member_topk_nll(frame, tg, vocab)
            tally.add(f"member/{name}/topk", nll_k)
            tally.add(f"member/{name}", out_k, "outside")
        if n == 1:
            continue
        if online is None:
            scored_prompt = max(len(prompt_ids) - 1, 0)
            nll = [v / scored_prompt if scored_prompt else None for v in prompt_nll]
            prior = pools.perplexity_weights(nll, PERPLEXITY_TAU)
            online = pools.OnlineWeights(prior, eta=ONLINE_ETA, alpha=ONLINE_ALPHA)
        tally.add("oracle", (-tl_arr).min(axis=0))
        for kind in WEIGHTINGS:
            w = _weights(kind, prior, online, tl_arr)
            lin = -np.logaddexp.reduce(np.log(w).T + tl_arr, axis=0)
            tally.add(f"linear/{kind}/full", lin)
            acc = sum(mx.array(w[:, i:i + 1].astype(np.float32)) * lps[i] for i in range(n))
            log_z = np.array(mx.logsumexp(acc, axis=-1), dtype=np.float64)
            tally.add(f"loglinear/{kind}/full", log_z - (w.T * tl_arr).sum(axis=0))
            for pool in POOLS:
                rows = [_ensemble_topk_nll(([f[0][t] for f in frames], [f[1][t] for f in frames],
                                            [float(f[2][t]) for f in frames]),
                                           tg[t], w[t], vocab, pool) for t in range(len(tg))]
                tally.add(f"{pool}/{kind}/topk", [r[0] for r in rows])
                if kind == "equal":
                    tally.add(pool, [r[1] for r in rows], "outside")


def _score_models(models: dict[str, str], docs: list, k: int, weights: str, fuse: str) -> dict:
    engines = load_engines(models)
    out = score(engines, docs, k=k, weights=weights, fuse=fuse)
    out["tokenizers"] = {e.model_name: e.fingerprint for e in engines}
    out["vocab_sizes"] = {e.model_name: e.vocab_size for e in engines}
    out["parameters"] = {e.model_name: sum(v.size for _, v in tree_flatten(e.model.parameters()))
                         for e in engines}
    return out


def score_in_child(models: dict[str, str], docs: list[Document | Tokenized], *, k: int,
                   weights: str = "online", fuse: str = "linear") -> dict:
    """`score` with the models (name -> dir) loaded in a child process, so that every byte
    of them is returned before the caller starts node processes that load them again."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(_score_models, models, docs, k, weights, fuse).result()


def per_document(per_doc: list[dict], best: str, resamples: int = 2000) -> dict:
    """Ensemble minus best member, per document: wins, and a bootstrap 95% interval of the
    byte-weighted BPB difference over documents (seeded: the same JSON gives the same)."""
    diff = np.array([d["ensemble_bpb"] - d["members"][best] for d in per_doc])
    nbytes = np.array([d["bytes"] for d in per_doc], dtype=np.float64)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(diff), size=(resamples, len(diff)))
    boot = (diff[idx] * nbytes[idx]).sum(axis=1) / nbytes[idx].sum(axis=1)
    return {"documents": len(diff), "ensemble_better_in": int((diff < 0).sum()),
            "bpb_difference": float((diff * nbytes).sum() / nbytes.sum()),
            "bootstrap_ci95": [float(np.percentile(boot, 2.5)),
                               float(np.percentile(boot, 97.5))]}


def _bpb(nll: np.ndarray, nbytes: int) -> float:
    return float(nll.sum() / (math.log(2) * nbytes))


def score(engines: list[Engine], docs: list[Document | Tokenized], *, k: int,
          weights: str = "online", fuse: str = "linear") -> dict:
    """Every quality figure of the bench's JSON (see the module docstring).

    Documents already tokenized are scored as they are (members must share a tokenizer);
    members with different tokenizers get the mixture over units (`quality_text`).
    """
    t0 = time.perf_counter()
    shared = (len({e.fingerprint for e in engines}) == 1
              and len({e.vocab_size for e in engines}) == 1)
    groups = [engines] if shared else [[e] for e in engines]
    tallies = [_Tokens() for _ in groups]
    for group, tally in zip(groups, tallies):
        for d, doc in enumerate(docs):
            tok = doc if isinstance(doc, Tokenized) else tokenize(group[0], doc)
            _score_document(group, tok, k, tally, d)
    doc_bytes = np.array([d.nbytes if isinstance(d, Tokenized) else d.scored_bytes
                          for d in docs])
    total = int(doc_bytes.sum())
    members, per_doc = {}, [dict(d.info if isinstance(d, Tokenized) else d.describe(),
                                 bytes=int(b), members={}) for d, b in zip(docs, doc_bytes)]
    for group, tally in zip(groups, tallies):
        doc_of = np.concatenate(tally.doc)
        for e in group:
            full = tally.cat(f"member/{e.model_name}/full")
            members[e.model_name] = {
                "bpb": _bpb(full, total),
                "bpb_topk": _bpb(tally.cat(f"member/{e.model_name}/topk"), total),
                "outside_topk_rate": float(tally.cat(f"member/{e.model_name}", "outside").mean()),
                "tokens": int(len(full)),
            }
            for d, row in enumerate(per_doc):
                row["members"][e.model_name] = _bpb(full[doc_of == d], int(doc_bytes[d]))
    best = min(members, key=lambda m: members[m]["bpb"])
    result = {"members": members, "scored_bytes": total, "documents": per_doc,
              "best_member": best, "shared_tokenizer": shared,
              "seconds": time.perf_counter() - t0}
    if len(engines) < 2:
        result["ensemble"] = {"bpb": None, "reason": "one member: no ensemble"}
        return result
    if not shared:          # different tokenizers: the exact mixture over units (quality_text)
        text_docs = [d for d in docs if isinstance(d, Document)]
        if len(text_docs) != len(docs):
            raise ValueError("members with different tokenizers need documents as text")
        mixed = quality_text.score_units(engines, [quality_text.member_tokens(e, text_docs)
                                                   for e in engines], text_docs)
        for name, m in mixed["members"].items():
            members[name]["bpb_text"] = m["bpb"]
        ens = mixed["ensemble"]
        ens["vs_best_member_per_document"] = per_document(mixed["documents"],
                                                          mixed["best_member"])
        ens["best_member"] = mixed["best_member"]
        for row, text_row in zip(per_doc, mixed["documents"]):
            row["ensemble_bpb"] = text_row["ensemble_bpb"]
            row["members_text"] = text_row["members"]
        result.update(ensemble=ens, seconds=time.perf_counter() - t0)
        return result
    tally = tallies[0]
    doc_of = np.concatenate(tally.doc)
    variants = {pool: {kind: {"bpb": _bpb(tally.cat(f"{pool}/{kind}/full"), total),
                              "bpb_topk": _bpb(tally.cat(f"{pool}/{kind}/topk"), total)}
                       for kind in WEIGHTINGS} for pool in POOLS}
    chosen = tally.cat(f"{fuse}/{weights}/full")
    for d, row in enumerate(per_doc):
        row["ensemble_bpb"] = _bpb(chosen[doc_of == d], int(doc_bytes[d]))
    ens = variants[fuse][weights]
    best_bpb = members[best]["bpb"]
    result["ensemble"] = {
        "bpb": ens["bpb"], "bpb_topk": ens["bpb_topk"], "weights": weights, "fuse": fuse,
        "vs_best_member": (ens["bpb"] - best_bpb) / best_bpb,
        "oracle_per_token_bpb": _bpb(tally.cat("oracle"), total),
        "outside_union_topk_rate": float(tally.cat(fuse, "outside").mean()),
        "vs_best_member_per_document": per_document(per_doc, best),
        "variants": variants,
    }
    return result
