"""Fusing members' top-k frames into one next-token distribution, and choosing the token.

Pure numpy, no I/O. The leader calls `fuse` once per step with the frames that arrived,
then `choose` to pick the token, and `OnlineWeights` learns from every committed token.

The floor for tokens outside a member's top-k
---------------------------------------------
A member that sent the top-k ids with log-probs and left `rest_mass` = 1 - Σ p(top-k)
says nothing about how that mass is spread over the other V - k tokens. We spread it
uniformly: p_i(t) = rest_mass_i / (V - k_i) for t outside member i's top-k. This keeps
each member's distribution proper (it sums to one), it never exceeds the bound that the
smallest top-k probability gives (rest mass spread over many tokens is tiny), and it is
the maximum-entropy choice given what was sent.

Pools
-----
- linear: p(t) = Σ_i w_i p_i(t) — a proper mixture, the default (best held-out
  perplexity, and robust: one member's confident mistake is diluted, not multiplied).
- loglinear: log q(t) ∝ Σ_i w_i log p_i(t) (product of experts), normalised over the
  candidate set (the union of the members' top-k), which is where the leader chooses.

Only candidates (the union of top-k ids) can be chosen: a token outside every member's
top-k has at most the floor under every member and cannot win.

Owns: the arithmetic of one step's fusion and of the weights. Does not: any I/O, any
message, or deciding who is a member.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Fused:
    """The fused distribution over the candidate ids (union of top-k, in members' rank order)."""

    ids: np.ndarray          # int64 [C]
    probs: np.ndarray        # float64 [C], the pooled probability of each candidate
    member_top: np.ndarray   # int64 [N], each member's own top-1 id


def member_floor(rest_mass: float, k: int, vocab_size: int) -> float:
    """Probability each member gives a token outside its top-k (uniform spread of rest mass)."""
    return max(rest_mass, 0.0) / max(vocab_size - k, 1)


def candidate_matrix(
    ids: list[np.ndarray], logprobs: list[np.ndarray], rest: list[float], vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates (union of ids, first-seen order) and each member's prob of each: [N, C]."""
    if len(ids) == 1:
        # One frame (a one-node mesh, or the only frame in time): its own ids are the
        # candidates, all inside its top-k. The general path below gives the same result
        # for distinct ids, at several times the cost, on every token.
        mid = np.asarray(ids[0], dtype=np.int64)
        ordered = np.sort(mid)
        if not np.any(ordered[1:] == ordered[:-1]):
            return mid, np.exp(np.asarray(logprobs[0], dtype=np.float64))[None, :]
    all_ids = np.concatenate([np.asarray(a, dtype=np.int64) for a in ids])
    uniq, first = np.unique(all_ids, return_index=True)
    order = np.argsort(first, kind="stable")
    cands = uniq[order]
    rank_of_sorted = np.empty_like(order)
    rank_of_sorted[order] = np.arange(len(order))
    probs = np.empty((len(ids), len(cands)), dtype=np.float64)
    for i, (mid, mlp, mrest) in enumerate(zip(ids, logprobs, rest)):
        probs[i, :] = member_floor(mrest, len(mid), vocab_size)
        pos = rank_of_sorted[np.searchsorted(uniq, np.asarray(mid, dtype=np.int64))]
        probs[i, pos] = np.exp(np.asarray(mlp, dtype=np.float64))
    return cands, probs


def fuse(
    ids: list[np.ndarray],
    logprobs: list[np.ndarray],
    rest: list[float],
    weights: np.ndarray,
    vocab_size: int,
    method: str = "linear",
) -> Fused:
    """Pool the members' frames with `weights` (normalised here) by `method`."""
    if not ids:
        raise ValueError("fuse needs at least one frame")
    cands, probs = candidate_matrix(ids, logprobs, rest, vocab_size)
    top = np.array([int(a[0]) for a in ids], dtype=np.int64)
    return Fused(ids=cands, probs=pool(probs, weights, method), member_top=top)


def pool(probs: np.ndarray, weights: np.ndarray, method: str) -> np.ndarray:
    """Pool members' probabilities of the candidates [N, C] with weights (normalised here)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    if method == "linear":
        return w @ probs
    if method == "loglinear":
        logq = w @ np.log(np.maximum(probs, 1e-300))
        pooled = np.exp(logq - logq.max())
        return pooled / pooled.sum()
    raise ValueError(f"unknown fusion method {method!r}")


def choose(
    fused: Fused, *, temperature: float, top_p: float, rng: np.random.Generator | None
) -> int:
    """Greedy (temperature 0) or seeded temperature / nucleus sampling over the candidates.

    Greedy ties go to the candidate seen first, i.e. the best-ranked in the first
    member's own (float32) order, so N copies of one model reproduce its greedy output
    even where float16 rounding makes two log-probs equal.
    """
    if temperature <= 0.0 or rng is None:
        return int(fused.ids[int(np.argmax(fused.probs))])
    ids, q = sampling_dist(fused, temperature=temperature, top_p=top_p)
    return int(ids[int(rng.choice(len(ids), p=q))])


def sampling_dist(fused: Fused, *, temperature: float,
                  top_p: float) -> tuple[np.ndarray, np.ndarray]:
    """The distribution `choose` samples from: candidates (most likely first) and their
    probabilities after temperature and nucleus (top-p) truncation."""
    logits = np.log(np.maximum(fused.probs, 1e-300)) / temperature
    p = np.exp(logits - logits.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    if top_p < 1.0:
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]
    else:
        keep = order
    return fused.ids[keep], p[keep] / p[keep].sum()


def verify_draft(fused: Fused, drafted: int, *, temperature: float, top_p: float,
                 rng: np.random.Generator | None) -> int:
    """The token at a drafted position: the draft itself when the fused distribution
    accepts it, else the fused choice.

    Greedy: the fused argmax (accepted when it is the draft), so a speculative answer is
    the plain answer token for token. Sampling: the plain loop's own draw x from q with
    the step's seeded generator, and the draft is accepted when x is the draft. For a
    deterministic drafter (one that proposes `drafted` with probability 1) this is
    speculative sampling's rule (Leviathan et al. 2023, Chen et al. 2023): accepted with
    probability q(drafted), else a draw from q without it, renormalised (the residual
    max(q - r, 0)); the token is distributed exactly as q. Drawn with the plain loop's
    randomness, it is also the plain loop's token for the same seed, whoever drafted and
    whatever they drafted."""
    del drafted                 # accepted exactly when the plain draw equals it
    return choose(fused, temperature=temperature, top_p=top_p, rng=rng)


def perplexity_weights(prompt_nll: list[float | None], tau: float) -> np.ndarray:
    """PackLLM-style weights: softmax(-NLL_i / tau) of each member's mean prompt NLL.

    Members that reported no NLL (e.g. a one-token prompt) get the mean of the others.
    """
    nll = np.array([np.nan if v is None else v for v in prompt_nll], dtype=np.float64)
    if not len(nll):
        return nll
    if np.all(np.isnan(nll)):
        return np.full(len(nll), 1.0 / len(nll))
    nll = np.where(np.isnan(nll), np.nanmean(nll), nll)
    z = -nll / tau
    e = np.exp(z - z.max())
    return e / e.sum()


class OnlineWeights:
    """Bayesian mixture weights with fixed share (Herbster & Warmuth).

    After each committed token t: w_i <- w_i * p_i(t)^eta, normalise; then
    w <- (1 - alpha) * w + alpha / N, so a member that was bad for one passage can win
    the next one back quickly (on held-out text this is what beat the best member: README,
    "What it is worth").
    """

    def __init__(self, prior: np.ndarray, *, eta: float, alpha: float) -> None:
        self.w = np.asarray(prior, dtype=np.float64) / np.sum(prior)
        self.eta = eta
        self.alpha = alpha

    def update(self, logp_of_token: np.ndarray) -> np.ndarray:
        """Fold in each member's exact log p of the committed token; return the new weights."""
        logw = np.log(self.w) + self.eta * np.asarray(logp_of_token, dtype=np.float64)
        w = np.exp(logw - logw.max())
        w /= w.sum()
        self.w = (1.0 - self.alpha) * w + self.alpha / len(w)
        return self.w


def initial_weights(mode: str, members: list, replies: dict, tau: float) -> dict[str, float]:
    """A session's starting weights by node id: `static` (each member's --weight),
    `perplexity`/`online` (PackLLM prior from each reply's `prompt_nll`), else equal."""
    ids = [m.node_id for m in members]
    if mode == "static":
        w = np.array([m.weight for m in members], dtype=np.float64)
    elif mode in ("perplexity", "online"):
        w = perplexity_weights([getattr(replies.get(i), "prompt_nll", None) for i in ids], tau)
    else:
        w = np.ones(len(ids))
    return dict(zip(ids, map(float, w / w.sum())))


def online_step(weights: dict[str, float], present: list[str], logp: np.ndarray, *,
                eta: float, alpha: float) -> None:
    """One fixed-share update of `weights` (in place) over the members in `present`."""
    if present:
        new = OnlineWeights(np.array([weights[m] for m in present]), eta=eta, alpha=alpha)
        weights.update(zip(present, map(float, new.update(logp))))
