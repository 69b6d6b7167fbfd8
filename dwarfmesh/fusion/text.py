"""Cross-vocabulary alignment for text-level sessions: pure functions, no I/O, no mlx.

Members whose tokenizers differ cannot be fused by token id. A text-level session keeps
TEXT as the committed state (each member re-encodes it with its own tokenizer) and
aligns members by the strings their tokens decode to. Two methods, both driven by
`text_leader.TextLeaderSession`:

**rank** (exact). Each round every member proposes a continuation that ends at a word or
line boundary (`proposal_cut`). Every member scores every candidate c with its own
tokenizer: NLL_i(c) = -(log P_i(ids_i(x + c)) - log P_i(ids_i(x))), where x is the
committed text and ids_i is member i's canonical encoding. That is the exact
log-probability member i gives the text under its own tokenization of it (not the
marginal over every tokenization, which nobody computes). The leader picks
argmin_c Σ_i w_i · NLL_i(c) / units(c) (`choose_candidate`), units = UTF-8 bytes of c,
plus one for an end-of-text. Nothing is approximated; the only choice made is the
per-byte normalisation, which makes candidates of different lengths comparable.

**fuse** (approximate, UniTE-style). Each step every member sends its top-k as the strings
the tokens decode to in context, their log-probs, its exact log p(end of text) and the
mass it left out. The candidates are the union of those strings plus end-of-text
(`align_texts`). Member i's probability of a candidate string s is:

1. exact: the sum of p_i(t) over i's top-k tokens t that decode to exactly s;
2. otherwise the probability of the LONGEST string in i's top-k that is a proper prefix of
   s (member i would spell s with that token first and more after it; p_i(prefix) is
   an upper-bound-like stand-in for P_i(text starts with s), not the real value);
3. otherwise the floor: i's left-out mass spread uniformly over the rest of its
   vocabulary, rest_mass_i / (V_i - k_i - 1), as in `fusion.member_floor`.

End-of-text is always aligned exactly (every member reports log p(EOS)). Pooled values
are not a normalised distribution over strings (rule 2 counts a prefix token's mass for
every longer candidate): argmax is well defined, sampling renormalises over candidates.
Top-k entries that decode to an incomplete UTF-8 character, to nothing, or to a special
token are left out by the member (their mass goes to the rest). This is an
approximation; exact byte-level conversion (arXiv 2410.09303) is not implemented.

Owns: the arithmetic of text sessions (alignment, scores, text hashes). Does not: any
I/O, any message, or running a model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dwarfmesh.fusion.pools import pool

# Re-exported: where proposals are cut is text handling the engine shares with fusion.
from dwarfmesh.fusion.textcut import complete_text, proposal_cut, utf8_len  # noqa: F401

TEXT_HASH_START = 0x6477_6D65_7368_0000     # hash of the empty answer
Candidate = tuple[str, bool]                 # (text, ends the answer)


def text_hash(h: int, piece: str) -> int:
    """Rolling hash of the committed answer text, extended by one committed piece."""
    digest = hashlib.blake2b(h.to_bytes(8, "little") + piece.encode("utf-8", "surrogatepass"),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little")


def units(text: str, eos: bool) -> int:
    """What a candidate's NLL is divided by: its UTF-8 bytes, plus one for end-of-text."""
    return max(utf8_len(text) + int(eos), 1)


def unique_candidates(proposals: Sequence[Candidate]) -> tuple[list[Candidate], list[int]]:
    """Distinct proposals in first-seen order, and for each proposal its candidate index
    (-1 for an empty one that does not end the answer: there is nothing to score)."""
    out: list[Candidate] = []
    index: list[int] = []
    for text, eos in proposals:
        if not text and not eos:
            index.append(-1)
            continue
        key = (text, bool(eos))
        if key not in out:
            out.append(key)
        index.append(out.index(key))
    return out, index


def choose_candidate(nll: np.ndarray, weights: np.ndarray,
                     candidates: Sequence[Candidate]) -> tuple[int, np.ndarray]:
    """Rank mode's choice: argmin_c Σ_i w_i NLL_i(c) / units(c), ties to the first.

    nll: [members, candidates] total NLL in nats; weights are normalised here.
    Returns the index and every candidate's weighted NLL per unit.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    u = np.array([units(t, e) for t, e in candidates], dtype=np.float64)
    per_unit = (w @ np.asarray(nll, dtype=np.float64)) / u
    return int(np.argmin(per_unit)), per_unit


# --- fuse mode: union of top-k by string ---------------------------------------------------


@dataclass(frozen=True)
class TextTopK:
    """One member's next-piece distribution as strings (what a TextFrame carries)."""

    texts: Sequence[str]
    logprobs: np.ndarray          # [k'] log p of each string (duplicates already summed)
    eos_logp: float               # exact log p(end of text)
    rest_mass: float              # mass of everything not in texts and not EOS
    vocab_size: int


@dataclass(frozen=True)
class FusedText:
    """Pooled values over the aligned candidates (union of strings, then end-of-text)."""

    candidates: list[Candidate]
    probs: np.ndarray             # [C] pooled value of each candidate (see module doc)
    member_probs: np.ndarray      # [N, C] each member's value of each candidate
    member_top: np.ndarray        # [N] index of each member's own most likely candidate


def text_floor(frame: TextTopK) -> float:
    """Probability a member gives a string it neither has nor has a prefix of (rule 3)."""
    return max(frame.rest_mass, 0.0) / max(frame.vocab_size - len(frame.texts) - 1, 1)


def member_text_prob(text: str, table: dict[str, float], floor: float) -> float:
    """Rules 1-3 of the module doc for one member, given its {string: prob} table."""
    exact = table.get(text)
    if exact is not None:
        return exact
    for end in range(len(text) - 1, 0, -1):       # the longest proper prefix first
        p = table.get(text[:end])
        if p is not None:
            return p
    return floor


def _table(frame: TextTopK) -> dict[str, float]:
    table: dict[str, float] = {}
    for t, lp in zip(frame.texts, np.asarray(frame.logprobs, dtype=np.float64)):
        if t:
            table[t] = table.get(t, 0.0) + float(np.exp(lp))
    return table


def align_texts(frames: Sequence[TextTopK]) -> tuple[list[Candidate], np.ndarray, np.ndarray]:
    """Candidates (union of strings in members' order, then EOS), each member's value of
    each [N, C], and each member's own top candidate index [N]."""
    tables = [_table(f) for f in frames]
    cands: list[Candidate] = []
    seen: set[str] = set()
    for table in tables:
        for t in sorted(table, key=lambda s: -table[s]):
            if t not in seen:
                seen.add(t)
                cands.append((t, False))
    cands.append(("", True))
    probs = np.empty((len(frames), len(cands)), dtype=np.float64)
    top = np.empty(len(frames), dtype=np.int64)
    for i, (frame, table) in enumerate(zip(frames, tables)):
        floor = text_floor(frame)
        for c, (text, eos) in enumerate(cands):
            probs[i, c] = (float(np.exp(frame.eos_logp)) if eos
                           else member_text_prob(text, table, floor))
        best = max(table, key=table.__getitem__) if table else None
        eos_p = float(np.exp(frame.eos_logp))
        top[i] = (len(cands) - 1 if best is None or eos_p > table[best]
                  else cands.index((best, False)))
    return cands, probs, top


def fuse_texts(frames: Sequence[TextTopK], weights: np.ndarray,
               method: str = "linear") -> FusedText:
    """Pool the aligned members' values: linear Σ w_i p_i(s), or log-linear Σ w_i log p_i(s)
    normalised over the candidates (as `fusion.fuse` does for ids)."""
    if not frames:
        raise ValueError("fuse_texts needs at least one frame")
    cands, probs, top = align_texts(frames)
    return FusedText(cands, pool(probs, weights, method), probs, top)
