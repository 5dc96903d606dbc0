import math
from fractions import Fraction

import pytest

from kd.stats import Z95, mcnemar_exact, mcnemar_mde, mcnemar_power, paired_comparison, wilson_interval


def _wilson_ref(k, n, z=Z95):
    # the textbook form, (k + z^2/2 -+ z sqrt(k(n-k)/n + z^2/4)) / (n + z^2), written independently
    z2 = z * z
    s = z * math.sqrt(k * (n - k) / n + z2 / 4)
    return (k + z2 / 2 - s) / (n + z2), (k + z2 / 2 + s) / (n + z2)


CASES = [(0, 1), (1, 1), (0, 10), (10, 10), (1, 10), (5, 10), (7, 8), (0, 1319), (1319, 1319), (3, 1319),
         (662, 1319), (1, 2), (123, 456)]


@pytest.mark.parametrize("k,n", CASES)
def test_wilson_matches_textbook_formula(k, n):
    lo, hi = wilson_interval(k, n)
    rlo, rhi = _wilson_ref(k, n)
    assert lo == pytest.approx(max(rlo, 0.0), abs=1e-12)
    assert hi == pytest.approx(min(rhi, 1.0), abs=1e-12)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


@pytest.mark.parametrize("k,n", CASES)
def test_wilson_matches_scipy(k, n):
    stats = pytest.importorskip("scipy.stats")
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(ci.low, abs=1e-12)
    assert hi == pytest.approx(ci.high, abs=1e-12)


def test_wilson_known_values_and_edges():
    z2 = Z95 ** 2
    # k = 0: [0, z^2/(n+z^2)]; k = n: [n/(n+z^2), 1] exactly at the clamped end
    assert wilson_interval(0, 10) == (0.0, pytest.approx(z2 / (10 + z2), abs=1e-15))
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(10 / (10 + z2), abs=1e-15)
    assert wilson_interval(0, 10)[0] == 0.0
    # symmetric around 1/2 for k = n/2
    lo, hi = wilson_interval(5, 10)
    assert lo + hi == pytest.approx(1.0, abs=1e-15)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)  # the usual published table value
    # a higher confidence gives a wider interval
    assert wilson_interval(3, 10, confidence=0.99)[0] < wilson_interval(3, 10)[0]


@pytest.mark.parametrize("k,n", [(-1, 5), (6, 5), (0, 0), (1, -1)])
def test_wilson_rejects_bad_counts(k, n):
    with pytest.raises(ValueError):
        wilson_interval(k, n)


def test_wilson_rejects_non_int():
    with pytest.raises(TypeError):
        wilson_interval(1.0, 5)
    with pytest.raises(TypeError):
        wilson_interval(True, 5)


def _mcnemar_ref(b, c):
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(Fraction(math.comb(m, i), 2 ** m) for i in range(min(b, c) + 1))
    return float(min(1, 2 * tail))


@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (1, 0), (0, 5), (5, 5), (3, 10), (10, 3), (1, 20), (40, 60),
                                 (0, 400), (300, 350)])
def test_mcnemar_matches_scipy_binomtest(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(_mcnemar_ref(b, c), rel=1e-12, abs=0)
    stats = pytest.importorskip("scipy.stats")
    if b + c:
        ref = stats.binomtest(b, b + c, 0.5, alternative="two-sided").pvalue
        assert mcnemar_exact(b, c) == pytest.approx(ref, rel=1e-9, abs=1e-300)


def test_mcnemar_known_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 1) == 1.0
    assert mcnemar_exact(0, 5) == 2 / 32  # 0.0625
    assert mcnemar_exact(0, 6) == 2 / 64
    assert mcnemar_exact(4, 4) == 1.0
    assert mcnemar_exact(2, 8) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert mcnemar_exact(3, 7) == mcnemar_exact(7, 3)
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def test_paired_comparison():
    a = {1: True, 2: True, 3: False, 4: False, 5: True}
    b = {1: True, 2: False, 3: True, 4: False, 5: False}
    r = paired_comparison(a, b)
    assert r == {"n": 5, "both": 1, "only_a": 2, "only_b": 1, "neither": 1, "accuracy_a": 0.6,
                 "accuracy_b": 0.4, "difference": pytest.approx(0.2), "mcnemar_p": 1.0, "mde": 1.0}
    with pytest.raises(ValueError, match="same questions"):
        paired_comparison(a, {1: True})
    with pytest.raises(ValueError):
        paired_comparison({}, {})


# ------------------------------------------------------------------------------------------------ power


def _power_monte_carlo(n, psi, d, reps=8000, seed=0):
    """Independent reference: simulate paired outcomes and apply the exact McNemar test (our own p-value)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    m = rng.binomial(n, psi, reps)
    c = rng.binomial(m, (psi + d) / (2 * psi))
    return float(np.mean([mcnemar_exact(int(mm - cc), int(cc)) <= 0.05 for mm, cc in zip(m, c)]))


@pytest.mark.parametrize("n,psi,d", [(48, 0.3, 0.2), (48, 0.1, 0.05), (100, 0.2, 0.1), (30, 0.5, 0.3)])
def test_power_matches_simulation(n, psi, d):
    exact = mcnemar_power(n, psi, d)
    assert exact == pytest.approx(_power_monte_carlo(n, psi, d), abs=0.02)  # MC s.e. <= 0.0056


def test_power_near_connor_for_large_n():
    # Connor (1987) normal approximation: n = (z_a sqrt(psi) + z_b sqrt(psi - d^2))^2 / d^2
    from scipy.stats import norm

    psi, d, n = 0.3, 0.08, 400
    z_b = (d * math.sqrt(n) - Z95 * math.sqrt(psi)) / math.sqrt(psi - d * d)
    assert mcnemar_power(n, psi, d) == pytest.approx(norm.cdf(z_b), abs=0.03)


def test_mde_is_the_smallest_detectable_grid_difference():
    for n, psi in [(16, 0.2), (48, 0.25), (64, 0.0), (128, 0.3)]:
        mde = mcnemar_mde(n, psi)
        k = round(mde * n)
        assert mcnemar_power(n, max(psi, k / n), k / n) >= 0.8
        assert k == 1 or mcnemar_power(n, max(psi, (k - 1) / n), (k - 1) / n) < 0.8
    # more questions detect smaller differences; more disagreement needs larger ones
    assert mcnemar_mde(200, 0.2) < mcnemar_mde(48, 0.2)
    assert mcnemar_mde(100, 0.4) > mcnemar_mde(100, 0.1)


def test_mde_known_value_all_discordant_one_way():
    # psi floored at d: every discordant pair goes the better model's way; with n = 16, 8 wins out of 8 give
    # p = 2 / 2^8 < 0.05 for sure only when M >= 6 is (almost) certain — the exact search says 8/16
    assert mcnemar_mde(16, 0.0) == 0.5


def test_paired_comparison_reports_mde():
    a = {i: i < 10 for i in range(48)}
    b = {i: i < 6 for i in range(48)}
    r = paired_comparison(a, b)
    assert r["mde"] == mcnemar_mde(48, 4 / 48)
