"""Bits per byte across tokenizers: each member alone, and their exact mixture.

Members with different tokenizers cannot be pooled token by token (their tokens are
different pieces of text), but each gives the exact probability of its own tokenization
of the same text. So the mixture works on *units* of text, cut where that is exact for
every member at once:

- each member's text session (`Engine.text_open_sync` / `text_extend_sync`, what rank and
  fuse-text sessions run on) holds prompt + text: its canonical ids, every id's exact
  log p, and log P(ids(prompt)) from before the text was added;
- a cut is a *stable* position: every member's ids have a token boundary there, and its
  canonical encoding of the text up to there is exactly those first ids (re-encoding the
  prefix changes nothing). Between two stable cuts a member's log p of the unit is the
  sum of its ids' log p: the exact probability of those ids given all before, a proper
  conditional. Summed over a document it is log P(ids(prompt + text)) − log P(ids(prompt)),
  the member's own figure (`bpb_text`);
- the ensemble's probability of unit j is the mixture Σ_i w_i P_i(unit j | before), with
  w from the mesh's own weight code: the prior `pools.perplexity_weights` of each
  member's prompt NLL per byte (τ = `PERPLEXITY_TAU`, as text_leader.py does), then
  `pools.OnlineWeights` with the text sessions' constants (η = `TEXT_ONLINE_ETA`, fixed
  share α = `TEXT_ONLINE_ALPHA`, chosen on dev text by `bench/tune_text_weights.py`) fed
  every member's log p of every unit, reset per document.

Why stable cuts: cutting at every line or word and re-encoding each prefix makes a unit's
"probability" exceed 1 wherever re-encoding merges across the cut (Qwen's "\\n\\n" after a
line that ended in "\\n": up to e^9 on fortunes). A member alone is unaffected (its units
telescope), but a mixture banks those gains without paying them back: per-word cuts gave
−7.1% for equal weights on the trio where stable cuts give −3.6%. `improper_units` counts
units with log p > 0 (only the first unit of a document can be, when the prompt's end is
not a stable cut).

Variants from the same units: equal and perplexity (static) weights, online without fixed
share (α = 0), online with the id path's constants (`ONLINE_ETA`, `ONLINE_ALPHA`), coarser
units (line ends only), an η × α grid (`SENSITIVITY_*`: sensitivity on this text, not
tuning; the constants were chosen on other text) and the per-unit oracle (a ceiling, not a
method).
"""

from __future__ import annotations

import math
import time

import numpy as np

from bench.texts import Document
from dwarfmesh.config import (
    ONLINE_ALPHA,
    ONLINE_ETA,
    PERPLEXITY_TAU,
    TEXT_ONLINE_ALPHA,
    TEXT_ONLINE_ETA,
)
from dwarfmesh.fusion import pools
from dwarfmesh.fusion.text import utf8_len

METHOD = ("exact mixture over units cut where every member's tokenization is stable "
          "(each member's exact log p of each unit of the same text; online fixed-share "
          "weights)")
SENSITIVITY_ETA = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0)
SENSITIVITY_ALPHA = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


def member_tokens(engine, docs: list[Document]) -> list[dict]:
    """One member's view of every document, through one text session each: log p of the
    prompt, then the canonical ids of prompt + text with every id's exact log p, and the
    character offset at which each id ends."""
    out = []
    for d, doc in enumerate(docs):
        session = f"bench-{d}"
        prompt = engine.text_open_sync(session, doc.prompt, False)
        engine.text_extend_sync(session, doc.text)
        ids, logp = engine.text_tokens_sync(session)
        engine.close_sync(session)
        ends = [len(engine.tokenizer.decode(ids[:k], skip_special_tokens=True,
                                            clean_up_tokenization_spaces=False))
                for k in range(1, len(ids) + 1)]
        out.append({"prompt_logp": prompt.logp, "prompt_bytes": prompt.nbytes, "ids": ids,
                    "logp": np.array(logp, dtype=np.float64), "ends": ends})
    return out


def units(engines: list, views: list[dict], doc: Document) -> tuple[np.ndarray, list[int]]:
    """[members, units] exact log p of each unit, and the character offset where each unit
    ends (in prompt + text); `views` is each member's `member_tokens` entry for `doc`."""
    full, start = doc.prompt + doc.text, len(doc.prompt)
    common = set.intersection(*(set(v["ends"]) for v in views))
    cuts, counts = [], []                     # counts[i]: member i's ids up to the cut
    for c in sorted(x for x in common if start < x < len(full)):
        n = []
        for e, v in zip(engines, views):
            ids = e.encode(full[:c])
            if v["ids"][:len(ids)] != ids:
                break
            n.append(len(ids))
        else:
            cuts.append(c)
            counts.append(n)
    cuts.append(len(full))
    counts.append([len(v["ids"]) for v in views])
    cum = np.array([[v["logp"][:k].sum() for v, k in zip(views, n)] for n in counts]).T
    before = np.array([[v["prompt_logp"]] for v in views])
    return np.diff(np.concatenate([before, cum], axis=1), axis=1), cuts


def _mixture(lp: np.ndarray, prior: np.ndarray, eta: float | None, alpha: float) -> np.ndarray:
    """Per-unit NLL of the mixture; lp is [members, units]; eta None = static weights."""
    online = pools.OnlineWeights(prior, eta=eta or 0.0, alpha=alpha)
    nll = np.empty(lp.shape[1])
    for j in range(lp.shape[1]):
        nll[j] = -np.logaddexp.reduce(np.log(online.w) + lp[:, j])
        if eta is not None:
            online.update(lp[:, j])
    return nll


def _line_units(lp: np.ndarray, cuts: list[int], full: str) -> np.ndarray:
    """The same log p summed into coarser units that end at a line end (or the end)."""
    ends = [j for j, c in enumerate(cuts) if full[c - 1] == "\n" or j == len(cuts) - 1]
    return np.stack([lp[:, a:b + 1].sum(axis=1)
                     for a, b in zip([0] + [e + 1 for e in ends[:-1]], ends)], axis=1)


def _bpb(nll: float, nbytes: float) -> float:
    return float(nll / (math.log(2) * nbytes))


def prepare(engines: list, per_member: list[list[dict]], docs: list[Document]) -> list[dict]:
    """Per document: the [members, units] log p (`units`), the unit ends, and the online
    weights' prior (perplexity weights of each member's prompt NLL per byte)."""
    out = []
    for d, doc in enumerate(docs):
        views = [pm[d] for pm in per_member]
        lp, cuts = units(engines, views, doc)
        prior = pools.perplexity_weights([-v["prompt_logp"] / max(v["prompt_bytes"], 1)
                                           for v in views], PERPLEXITY_TAU)
        out.append({"lp": lp, "cuts": cuts, "prior": prior, "full": doc.prompt + doc.text})
    return out


def grid_nll(prepared: list[dict], cells: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Total mixture NLL (nats) over all documents for each (eta, alpha) cell."""
    return {k: float(sum(_mixture(p["lp"], p["prior"], eta, alpha).sum() for p in prepared))
            for k, (eta, alpha) in cells.items()}


def cell(eta: float, alpha: float) -> str:
    return f"eta={eta:g},alpha={alpha:g}"


def score_units(engines: list, per_member: list[list[dict]], docs: list[Document]) -> dict:
    """Every figure, from each member's `member_tokens` (in `engines` order)."""
    t0 = time.perf_counter()
    names = [e.model_name for e in engines]
    doc_bytes = np.array([utf8_len(doc.text) for doc in docs], dtype=np.float64)
    total = float(doc_bytes.sum())
    settings = {"online": (TEXT_ONLINE_ETA, TEXT_ONLINE_ALPHA),
                "online, no fixed share": (TEXT_ONLINE_ETA, 0.0),
                "online, id-path constants": (ONLINE_ETA, ONLINE_ALPHA),
                "equal": (None, 0.0), "perplexity": (None, 0.0)}
    grid = {cell(e, a): (e, a) for e in SENSITIVITY_ETA for a in SENSITIVITY_ALPHA}
    keys = [*settings, *grid, "online, line units", "oracle"]
    nll = {k: np.zeros(len(docs)) for k in keys}
    member_nll = np.zeros((len(names), len(docs)))
    n_units = improper = 0
    for d, p in enumerate(prepare(engines, per_member, docs)):
        lp, prior = p["lp"], p["prior"]
        n_units += lp.shape[1]
        improper += int((lp > 1e-9).sum())
        member_nll[:, d] = -lp.sum(axis=1)
        equal = np.full(len(names), 1.0 / len(names))
        for key, (eta, alpha) in {**settings, **grid}.items():
            nll[key][d] = _mixture(lp, equal if key == "equal" else prior, eta, alpha).sum()
        lines = _line_units(lp, p["cuts"], p["full"])
        nll["online, line units"][d] = _mixture(lines, prior, TEXT_ONLINE_ETA,
                                                TEXT_ONLINE_ALPHA).sum()
        nll["oracle"][d] = (-lp).min(axis=0).sum()
    members = {n: {"bpb": _bpb(member_nll[i].sum(), total),
                   "per_document": [_bpb(v, b) for v, b in zip(member_nll[i], doc_bytes)]}
               for i, n in enumerate(names)}
    best = min(members, key=lambda n: members[n]["bpb"])
    best_bpb = members[best]["bpb"]

    def figure(key: str) -> dict:
        bpb = _bpb(nll[key].sum(), total)
        return {"bpb": bpb, "vs_best_member": (bpb - best_bpb) / best_bpb}
    per_doc = [{**doc.describe(), "bytes": int(b), "ensemble_bpb": _bpb(nll["online"][d], b),
                "members": {n: members[n]["per_document"][d] for n in names}}
               for d, (doc, b) in enumerate(zip(docs, doc_bytes))]
    return {
        "members": members, "best_member": best, "scored_bytes": int(total),
        "documents": per_doc,
        "ensemble": {"method": METHOD, "exact": True, "weights": "online",
                     "online_eta": TEXT_ONLINE_ETA, "online_alpha": TEXT_ONLINE_ALPHA,
                     **figure("online"), "units": n_units,
                     "bytes_per_unit": total / max(n_units, 1), "improper_units": improper,
                     "oracle_per_unit_bpb": figure("oracle")["bpb"],
                     "variants": {k: figure(k) for k in [*settings, "online, line units"]},
                     "sensitivity": {k: figure(k) for k in grid}},
        "seconds": time.perf_counter() - t0,
    }
