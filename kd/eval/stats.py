"""Statistics for accuracy reports, on scipy: Wilson score intervals for a proportion, the exact McNemar test for
two models answering the same questions, Holm's correction within a family of such tests, and the power of the
test: the smallest difference a paired comparison of n questions could detect at a given rate of disagreement,
and the questions a given difference needs. Pure functions, float64, deterministic."""

from __future__ import annotations

import math
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


def mcnemar_mde(n: int, discordant: float, alpha: float = ALPHA, power: float = POWER) -> float | None:
    """The smallest accuracy difference (a multiple of 1/n) that the exact McNemar test over n paired questions
    detects with probability >= `power` at two-sided level `alpha`, when the two models disagree on a fraction
    `discordant` of the questions (held at that rate: no best-case floor).

    A difference can never exceed the disagreement (each point of difference is a question one model got right
    and the other wrong), so only differences up to `discordant` are candidates. None when none of them is
    detectable (for example at a low disagreement: n = 48 needs at least 1/6 of the questions discordant, all
    one way, to detect 16.7 points; at 30 % disagreement the smallest detectable difference is 22.9 points)."""
    _check_count("n", n)
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= discordant <= 1:
        raise ValueError(f"discordant must be in [0, 1], got {discordant}")
    kmax = math.floor(discordant * n + 1e-9)  # the largest difference (in questions) this disagreement allows

    def enough(k: int) -> bool:
        return mcnemar_power(n, discordant, min(k / n, discordant), alpha) >= power

    # at a fixed disagreement the power rises with the difference (the better model wins a larger share of the
    # discordant pairs): bisect over k = 1..kmax, then make sure no k just below the bisection point qualifies
    if kmax < 1 or not enough(kmax):
        return None
    lo, hi = 1, kmax
    while lo < hi:
        mid = (lo + hi) // 2
        if enough(mid):
            hi = mid
        else:
            lo = mid + 1
    while lo > 1 and enough(lo - 1):
        lo -= 1
    return lo / n


def mcnemar_sample_size(difference: float, discordant: float, alpha: float = ALPHA, power: float = POWER,
                        n_max: int = 1_000_000) -> int:
    """The smallest number of paired questions whose exact McNemar test detects a true accuracy difference
    `difference` with probability >= `power` at two-sided level `alpha`, when the models disagree on a fraction
    `discordant` of the questions (0 < difference <= discordant <= 1).

    The exact power is not monotone in n (the test is discrete): this is the smallest n found by bisection
    between the power's brackets, then stepped down while n - 1 still qualifies; the normal approximation
    (Connor 1987) only seeds the bracket."""
    if not 0 < difference <= discordant <= 1:
        raise ValueError(f"need 0 < difference <= discordant <= 1, got {difference}, {discordant}")
    z_b = stats.norm.ppf(power)
    z_a = stats.norm.ppf(1 - alpha / 2)
    approx = (z_a * math.sqrt(discordant) + z_b * math.sqrt(discordant - difference ** 2)) ** 2 / difference ** 2
    hi = max(2, int(math.ceil(approx)))
    while mcnemar_power(hi, discordant, difference, alpha) < power:
        if hi >= n_max:
            raise ValueError(f"more than {n_max} questions would be needed")
        hi = min(n_max, hi * 2)
    lo = 1
    while lo < hi:
        mid = (lo + hi) // 2
        if mcnemar_power(mid, discordant, difference, alpha) >= power:
            hi = mid
        else:
            lo = mid + 1
    while lo > 1 and mcnemar_power(lo - 1, discordant, difference, alpha) >= power:
        lo -= 1
    return lo


# ------------------------------------------------------------------------------------------------ multiplicity


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm–Bonferroni adjusted p-values within one family of tests: sorted ascending (ties by name), the i-th
    smallest (0-based, of m) gets max over j <= i of min(1, (m - j) p_(j)). A test rejects at family-wise level
    alpha exactly when its adjusted p <= alpha. (statsmodels' multipletests(method="holm") computes the same;
    kd-prime does not depend on statsmodels.)"""
    order = sorted(pvalues, key=lambda k: (pvalues[k], k))
    m = len(order)
    out: dict[str, float] = {}
    running = 0.0
    for i, k in enumerate(order):
        p = float(pvalues[k])
        if not 0 <= p <= 1:
            raise ValueError(f"p-value of {k!r} must be in [0, 1], got {p}")
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out
