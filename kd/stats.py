"""Small, dependency-free statistics for accuracy reports: Wilson score intervals for a proportion and an
exact McNemar test for two models answering the same questions. Pure functions, float64, deterministic."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Mapping

Z95 = 1.959963984540054  # Phi^-1(0.975)


def _check_counts(k: int, n: int) -> None:
    for name, v in (("k", k), ("n", n)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n={n}], got {k}")


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (default: 95%).

    Bounds are clamped to [0, 1]; k=0 gives low exactly 0.0 and k=n gives high exactly 1.0."""
    _check_counts(k, n)
    if not z > 0:
        raise ValueError(f"z must be positive, got {z}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = (z / denom) * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n))
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for discordant counts b (A right, B wrong) and c (A wrong, B right).

    Under H0 the discordant pairs split Binomial(b+c, 1/2); p = min(1, 2 * P[X <= min(b, c)]), computed in
    exact rational arithmetic and rounded once. No discordant pairs: p = 1."""
    for name, v in (("b", b), ("c", c)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** m)))


def paired_comparison(correct_a: Mapping[int, bool], correct_b: Mapping[int, bool]) -> dict:
    """Compare two models on the same questions (keyed by question id).

    Returns counts (both, only_a, only_b, neither), n, accuracies, their difference (a - b) and the exact
    McNemar p-value. The ids must match exactly: comparing different question sets is an error."""
    if set(correct_a) != set(correct_b):
        only_a = sorted(set(correct_a) - set(correct_b))[:5]
        only_b = sorted(set(correct_b) - set(correct_a))[:5]
        raise ValueError(f"paired comparison needs the same questions (e.g. only in a: {only_a}, "
                         f"only in b: {only_b})")
    n = len(correct_a)
    if n == 0:
        raise ValueError("paired comparison of zero questions")
    both = only_a = only_b = neither = 0
    for i in correct_a:
        a, b = bool(correct_a[i]), bool(correct_b[i])
        both += a and b
        only_a += a and not b
        only_b += b and not a
        neither += not a and not b
    acc_a = (both + only_a) / n
    acc_b = (both + only_b) / n
    return {
        "n": n,
        "both": both,
        "only_a": only_a,
        "only_b": only_b,
        "neither": neither,
        "accuracy_a": acc_a,
        "accuracy_b": acc_b,
        "difference": (only_a - only_b) / n,
        "mcnemar_p": mcnemar_exact(only_a, only_b),
    }
