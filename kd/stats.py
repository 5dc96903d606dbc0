"""Statistics for accuracy reports, on scipy: Wilson score intervals for a proportion, the exact McNemar test for
two models answering the same questions, and the power of that test (the smallest difference a paired
comparison of n questions could detect). Pure functions, float64, deterministic."""

from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy import stats

Z95 = 1.959963984540054  # Phi^-1(0.975)
ALPHA = 0.05
POWER = 0.8


def _check_count(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")


def _check_counts(k: int, n: int) -> None:
    _check_count("k", k)
    _check_count("n", n)
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n={n}], got {k}")


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (scipy's; k=0 gives low 0.0, k=n gives high 1.0)."""
    _check_counts(k, n)
    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    low = 0.0 if k == 0 else max(0.0, float(ci.low))
    high = 1.0 if k == n else min(1.0, float(ci.high))
    return low, high


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for discordant counts b (A right, B wrong) and c (A wrong, B right):
    under H0 the b + c discordant pairs split Binomial(b+c, 1/2). No discordant pairs: p = 1."""
    for name, v in (("b", b), ("c", c)):
        _check_count(name, v)
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if b + c == 0:
        return 1.0
    return float(min(1.0, stats.binomtest(int(b), int(b + c), 0.5).pvalue))


def paired_comparison(correct_a: Mapping[int, bool], correct_b: Mapping[int, bool]) -> dict:
    """Compare two models on the same questions (keyed by question id).

    Returns counts (both, only_a, only_b, neither), n, accuracies, their difference (a - b), the exact McNemar
    p-value, and `mde`: the smallest difference this n could detect (mcnemar_mde at the observed discordance).
    The ids must match exactly: comparing different question sets is an error."""
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
    return {
        "n": n, "both": both, "only_a": only_a, "only_b": only_b, "neither": neither,
        "accuracy_a": (both + only_a) / n, "accuracy_b": (both + only_b) / n,
        "difference": (only_a - only_b) / n,
        "mcnemar_p": mcnemar_exact(only_a, only_b),
        "mde": mcnemar_mde(n, (only_a + only_b) / n),
    }


# ------------------------------------------------------------------------------------------------ power


def mcnemar_power(n: int, discordant: float, difference: float, alpha: float = ALPHA) -> float:
    """Exact power of the two-sided exact McNemar test at level `alpha` with n paired questions, when a question is
    discordant (one model right, the other wrong) with probability `discordant` and the true accuracy
    difference is `difference` (0 < difference <= discordant <= 1).

    The number of discordant pairs is M ~ Binomial(n, discordant); given M = m, the pairs the better model wins
    are Binomial(m, (discordant + difference) / (2 discordant)). Power = P(p-value <= alpha), summed exactly."""
    if not 0 < difference <= discordant <= 1:
        raise ValueError(f"need 0 < difference <= discordant <= 1, got {difference}, {discordant}")
    p_win = (discordant + difference) / (2 * discordant)
    m = np.arange(n + 1)
    w_m = stats.binom.pmf(m, n, discordant)
    power = 0.0
    for mm in m[w_m > 1e-15]:
        c = np.arange(mm + 1)
        # two-sided exact p-value of each outcome c (wins of the better model) out of mm discordant pairs
        p_two = np.minimum(1.0, 2 * stats.binom.cdf(np.minimum(c, mm - c), mm, 0.5))
        reject = p_two <= alpha
        if reject.any():
            power += w_m[mm] * stats.binom.pmf(c[reject], mm, p_win).sum()
    return float(power)


def mcnemar_mde(n: int, discordant: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest accuracy difference (a multiple of 1/n) that the exact McNemar test over n paired questions
    detects with probability >= `power` at two-sided level `alpha`, when the two models disagree on a fraction
    `discordant` of questions (the observed rate; never below the difference itself, since a difference d
    needs at least d·n discordant questions). 1.0 when even the largest difference is not detectable."""
    _check_count("n", n)
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")

    def enough(k: int) -> bool:
        d = k / n
        return mcnemar_power(n, max(discordant, d), d, alpha) >= power

    # power rises with the difference (up to the test's discreteness): bisect over k = 1..n, then make sure
    # no smaller k just below the bisection point also qualifies
    lo, hi = 1, n
    if not enough(hi):
        return 1.0
    while lo < hi:
        mid = (lo + hi) // 2
        if enough(mid):
            hi = mid
        else:
            lo = mid + 1
    while lo > 1 and enough(lo - 1):
        lo -= 1
    return lo / n
