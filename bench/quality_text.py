"""Bits per byte across tokenizers: each member alone, and their sequence-level mixture.

Members with different tokenizers cannot be pooled token by token (their tokens are
different pieces of text), but every member can give the exact probability of the same
STRING. So the text is scored a line at a time, through the mesh's own text sessions
(`Engine.text_open_sync` / `text_extend_sync`, what rank and fuse-text sessions run on):

- member i's log p of line j is log P_i(ids_i(before + line)) − log P_i(ids_i(before)),
  ids_i being member i's canonical encoding of the text so far. Re-encoding at the seam
  is exact, not approximated (the engine keeps every id's log p). Summed over a document
  this is log P_i(ids_i(prompt + text)) − log P_i(ids_i(prompt)): the member's own BPB
  on its own tokenization, as in `bench/quality.py` (which tokenizes prompt and text
  apart, so the two differ slightly at that one seam).
- the ensemble's probability of line j is the mixture Σ_i w_i P_i(line j | before), with
  w from the mesh's own weight code: the prior `fusion.perplexity_weights` of each
  member's prompt NLL per byte (τ = `PERPLEXITY_TAU`, as rank.py does), then
  `fusion.OnlineWeights` (η = `ONLINE_ETA`, fixed share α = `ONLINE_ALPHA`) fed every
  member's log p of every line, reset per document. The line is the unit of the mixture
  (../shared/notes/EVAL.md measured this method at 4.3–5% below the best member).

This is exact in the sense the issue asks for: no member's distribution is approximated
and nothing is aligned; each member's number is the probability of its canonical
tokenization (other tokenizations of the same string are not summed, for any figure).
It is a scoring figure: the mesh's rank mode chooses among proposals with the same
weights, but generation is not a mixture of line distributions.

Variants from the same per-line numbers: equal and perplexity (static) weights, online
without fixed share (α = 0), a small η × α grid (sensitivity, not tuning: the headline
uses the mesh's constants), and the per-line oracle (a ceiling, not a method).
"""

from __future__ import annotations

import math
import time

import numpy as np

from bench.texts import Document
from dwarfmesh import fusion
from dwarfmesh.config import ONLINE_ALPHA, ONLINE_ETA, PERPLEXITY_TAU
from dwarfmesh.textfuse import utf8_len

METHOD = ("sequence-level mixture per line, exact (each member's exact log p of each line of "
          "the same text; online fixed-share weights)")
SENSITIVITY_ETA = (0.25, 0.5, 1.0)
SENSITIVITY_ALPHA = (0.0, 0.02, 0.05, 0.1)


def lines_of(text: str) -> list[str]:
    """The mixture's units: lines, each with its newline."""
    return text.splitlines(keepends=True)


def member_lines(engine, docs: list[Document]) -> list[dict]:
    """One member's exact log p (nats) of every line of every document, and its prompt
    NLL per byte (the prior's input), through one text session per document."""
    out = []
    for d, doc in enumerate(docs):
        session = f"bench-{d}"
        opened = engine.text_open_sync(session, doc.prompt, False)
        logp = [engine.text_extend_sync(session, line).logp for line in lines_of(doc.text)]
        engine.close_sync(session)
        out.append({"prompt_nll_per_byte": -opened.logp / max(opened.nbytes, 1),
                    "logp": np.array(logp, dtype=np.float64)})
    return out


def _mixture(lp: np.ndarray, prior: np.ndarray, eta: float | None, alpha: float) -> np.ndarray:
    """Per-line NLL of the mixture; lp is [members, lines]; eta None = static weights."""
    online = fusion.OnlineWeights(prior, eta=eta or 0.0, alpha=alpha)
    nll = np.empty(lp.shape[1])
    for j in range(lp.shape[1]):
        nll[j] = -np.logaddexp.reduce(np.log(online.w) + lp[:, j])
        if eta is not None:
            online.update(lp[:, j])
    return nll


def _bpb(nll: float, nbytes: int) -> float:
    return float(nll / (math.log(2) * nbytes))


def score_lines(names: list[str], per_member: list[list[dict]], docs: list[Document]) -> dict:
    """Every figure, from each member's per-line log p (`member_lines`), in `names` order."""
    t0 = time.perf_counter()
    nbytes = np.array([[utf8_len(x) for x in lines_of(doc.text)] for doc in docs], dtype=object)
    doc_bytes = np.array([sum(b) for b in nbytes], dtype=np.float64)
    total = int(doc_bytes.sum())
    settings = {"online": (ONLINE_ETA, ONLINE_ALPHA), "online, no fixed share": (ONLINE_ETA, 0.0),
                "equal": (None, 0.0), "perplexity": (None, 0.0)}
    grid = {f"eta={e},alpha={a}": (e, a) for e in SENSITIVITY_ETA for a in SENSITIVITY_ALPHA}
    nll = {k: np.zeros(len(docs)) for k in [*settings, *grid, "oracle"]}
    member_nll = np.zeros((len(names), len(docs)))
    for d in range(len(docs)):
        lp = np.stack([pm[d]["logp"] for pm in per_member])             # [members, lines]
        member_nll[:, d] = -lp.sum(axis=1)
        prior = fusion.perplexity_weights([pm[d]["prompt_nll_per_byte"] for pm in per_member],
                                          PERPLEXITY_TAU)
        equal = np.full(len(names), 1.0 / len(names))
        for key, (eta, alpha) in {**settings, **grid}.items():
            nll[key][d] = _mixture(lp, equal if key == "equal" else prior, eta, alpha).sum()
        nll["oracle"][d] = (-lp).min(axis=0).sum()
    members = {n: {"bpb": _bpb(member_nll[i].sum(), total),
                   "lines": int(sum(len(pm[d]["logp"]) for d in range(len(docs)))),
                   "per_document": [_bpb(v, b) for v, b in zip(member_nll[i], doc_bytes)]}
               for i, (n, pm) in enumerate(zip(names, per_member))}
    best = min(members, key=lambda n: members[n]["bpb"])
    best_bpb = members[best]["bpb"]

    def figure(key: str) -> dict:
        bpb = _bpb(nll[key].sum(), total)
        return {"bpb": bpb, "vs_best_member": (bpb - best_bpb) / best_bpb}
    per_doc = [{**doc.describe(), "bytes": int(b), "ensemble_bpb": _bpb(nll["online"][d], b),
                "members": {n: members[n]["per_document"][d] for n in names}}
               for d, (doc, b) in enumerate(zip(docs, doc_bytes))]
    return {
        "members": members, "best_member": best, "scored_bytes": total,
        "lines": int(sum(len(lines_of(doc.text)) for doc in docs)),
        "documents": per_doc,
        "ensemble": {"method": METHOD, "exact": True, "weights": "online",
                     "online_eta": ONLINE_ETA, "online_alpha": ONLINE_ALPHA,
                     **figure("online"),
                     "oracle_per_line_bpb": _bpb(nll["oracle"].sum(), total),
                     "variants": {k: figure(k) for k in settings},
                     "sensitivity": {k: figure(k) for k in grid}},
        "seconds": time.perf_counter() - t0,
    }
