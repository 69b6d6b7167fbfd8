"""Statistics for pass@1 figures a reviewer would accept: pure functions, no I/O.

- `wilson_interval`: the 95% Wilson score interval of a share (well-behaved at 0 and 1
  and for the small n of a quick run, unlike the normal approximation).
- `mcnemar_exact`: the exact two-sided McNemar (sign) test on the problems where two
  systems disagree; the problems both solve or both miss say nothing about which is
  better.
- `paired`: both of those for two systems' per-problem results on the problems both ran.
"""

from __future__ import annotations

import math

Z95 = 1.959963984540054           # the standard normal's 97.5% quantile


def wilson_interval(passed: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for `passed` successes in `n` trials; (0, 1) when n = 0."""
    if n <= 0:
        return 0.0, 1.0
    p = passed / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 (or n) successes the bound is exactly 0 (or 1); centre - half rounds to ±1e-17,
    # which puts the point estimate outside its own interval.
    lo = 0.0 if passed == 0 else max(0.0, centre - half)
    hi = 1.0 if passed == n else min(1.0, centre + half)
    return lo, hi


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact p-value that discordant pairs split as evenly as a fair coin would.

    `only_a`: problems A solves and B does not; `only_b` the reverse. With no discordant
    pair there is no evidence either way (p = 1).
    """
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def paired(a: dict[str, bool], b: dict[str, bool]) -> dict:
    """A against B on the problems both have results for."""
    common = sorted(set(a) & set(b))
    only_a = [t for t in common if a[t] and not b[t]]
    only_b = [t for t in common if b[t] and not a[t]]
    return {
        "problems": len(common),
        "both": sum(1 for t in common if a[t] and b[t]),
        "neither": sum(1 for t in common if not a[t] and not b[t]),
        "only_a": only_a,
        "only_b": only_b,
        "difference": (len(only_a) - len(only_b)) / len(common) if common else 0.0,
        "p_value": mcnemar_exact(len(only_a), len(only_b)),
    }
