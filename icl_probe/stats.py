"""The statistics of a study: Wilson intervals for accuracies, standard errors for means, exact paired tests.

Plain Python floats, no dependencies: the study's counts are small (tens to hundreds of queries).
"""

from __future__ import annotations

__all__ = ["wilson", "mean_se", "binomial_two_sided", "mcnemar", "sign_test"]

import math
import statistics

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(k: int, n: int, z: float = Z95) -> dict:
    """{k, n, p, low, high}: k successes in n trials and the Wilson score interval for p (95% by default)."""
    if n <= 0:
        return {"k": k, "n": n, "p": None, "low": None, "high": None}
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if k == 0 else max(0.0, centre - half)  # exactly 0 and 1 at the ends, where rounding would not give them
    high = 1.0 if k == n else min(1.0, centre + half)
    return {"k": k, "n": n, "p": p, "low": low, "high": high}


def mean_se(values: list[float]) -> dict:
    """{mean, se, n}: the mean and its standard error (sample std / √n; null for fewer than two values)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "se": None, "n": 0}
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "se": se, "n": len(values)}


def binomial_two_sided(k: int, n: int) -> float:
    """The exact two-sided p-value of k successes in n fair coin flips: 2 · P(X ≤ min(k, n − k)), at most 1."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """The exact McNemar test of two methods' hits on the same queries: only the discordant pairs count.

    Returns {n, a_only, b_only, p}: a_only queries where a hits and b misses, b_only the reverse.
    """
    if len(a) != len(b):
        raise ValueError(f"paired lists differ in length: {len(a)} and {len(b)}")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    return {"n": len(a), "a_only": a_only, "b_only": b_only, "p": binomial_two_sided(a_only, a_only + b_only)}


def sign_test(a: list[float], b: list[float]) -> dict:
    """The exact sign test of paired values: {n, a_greater, b_greater, p}; ties are left out."""
    if len(a) != len(b):
        raise ValueError(f"paired lists differ in length: {len(a)} and {len(b)}")
    greater = sum(1 for x, y in zip(a, b) if x > y)
    less = sum(1 for x, y in zip(a, b) if x < y)
    return {"n": len(a), "a_greater": greater, "b_greater": less, "p": binomial_two_sided(greater, greater + less)}
