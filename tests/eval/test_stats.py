import math
from fractions import Fraction

import pytest

from kd.eval.stats import (
    Z95,
    holm,
    mcnemar_exact,
    mcnemar_mde,
    mcnemar_power,
    mcnemar_sample_size,
    paired_comparison,
    wilson_interval,
)


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
                 "accuracy_b": 0.4, "difference": pytest.approx(0.2), "mcnemar_p": 1.0, "mde": None}
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


def _power_ref(n, psi, d):
    """Exact power by brute-force binomial sums in float64 (math.comb), with the p-value from _mcnemar_ref: an
    implementation independent of kd.eval.stats (and of scipy)."""
    pw = (psi + d) / (2 * psi)
    total = 0.0
    for m in range(n + 1):
        w = math.comb(n, m) * psi ** m * (1 - psi) ** (n - m)
        if w < 1e-300:
            continue
        for c in range(m + 1):
            if _mcnemar_ref(m - c, c) <= 0.05:
                total += w * math.comb(m, c) * pw ** c * (1 - pw) ** (m - c)
    return total


def _mde_ref(n, psi):
    """The smallest k/n <= psi whose power at disagreement psi (held, no floor) is >= 0.8; None if none."""
    for k in range(1, n + 1):
        if k / n > psi + 1e-12:
            return None
        if _power_ref(n, psi, min(k / n, psi)) >= 0.8:
            return k / n
    return None


@pytest.mark.parametrize("n,psi,d", [(48, 0.3, 0.2), (48, 1 / 6, 1 / 6), (20, 0.45, 0.25), (64, 0.1, 0.05)])
def test_power_matches_brute_force(n, psi, d):
    assert mcnemar_power(n, psi, d) == pytest.approx(_power_ref(n, psi, d), abs=1e-9)


def test_mde_issue_numbers_at_the_observed_disagreement():
    """Issue 19 item 4, n = 48: 16.7 pp needs disagreement >= 1/6 (every discordant question one way); at 30 %
    disagreement the smallest detectable difference is 22.9 pp, at 50 % 31.2 pp. No best-case floor: below 1/6
    disagreement nothing is detectable (a difference can never exceed the disagreement)."""
    assert mcnemar_mde(48, 8 / 48) == pytest.approx(8 / 48)
    assert mcnemar_mde(48, 0.3) == pytest.approx(11 / 48)   # 22.9 pp
    assert mcnemar_mde(48, 0.5) == pytest.approx(15 / 48)   # 31.2 pp
    for psi in (0.0, 0.05, 0.1, 7 / 48):
        assert mcnemar_mde(48, psi) is None
    # the old best case (disagreement floored at the difference) claimed 16.7 pp at any disagreement <= 1/6
    assert mcnemar_power(48, 0.1, 0.1) < 0.8


@pytest.mark.parametrize("n,psi", [(16, 0.5), (20, 0.45), (48, 0.25), (48, 0.3), (30, 0.7), (12, 1.0), (48, 0.1)])
def test_mde_matches_brute_force(n, psi):
    ref = _mde_ref(n, psi)
    got = mcnemar_mde(n, psi)
    assert got == (None if ref is None else pytest.approx(ref, abs=1e-12))


def test_mde_monotone_in_n_and_disagreement():
    # more questions detect smaller differences; more disagreement needs larger ones
    assert mcnemar_mde(200, 0.2) < mcnemar_mde(64, 0.3)
    assert mcnemar_mde(100, 0.4) > mcnemar_mde(100, 0.2)
    with pytest.raises(ValueError):
        mcnemar_mde(48, 1.5)


def test_sample_size_is_the_smallest_n():
    for d, psi in [(0.2, 0.3), (0.1, 0.3), (1 / 6, 1 / 6), (0.05, 0.1)]:
        n = mcnemar_sample_size(d, psi)
        assert mcnemar_power(n, psi, d) >= 0.8
        assert mcnemar_power(n - 1, psi, d) < 0.8
    # consistent with the mde: 48 questions at 30 % disagreement detect 11/48 but not 10/48
    assert mcnemar_sample_size(11 / 48, 0.3) <= 48 < mcnemar_sample_size(10 / 48, 0.3)
    # near Connor's normal approximation for a small difference
    from scipy.stats import norm

    d, psi = 0.05, 0.2
    connor = (norm.ppf(0.975) * math.sqrt(psi) + norm.ppf(0.8) * math.sqrt(psi - d * d)) ** 2 / d ** 2
    assert connor <= mcnemar_sample_size(d, psi) <= 1.1 * connor  # the exact test is a little conservative
    with pytest.raises(ValueError):
        mcnemar_sample_size(0.4, 0.3)


def _holm_ref(ps):
    """Holm from the definition: the i-th smallest p (1-based) rejects at level a while p_(j) <= a / (m - j + 1) for
    every j <= i; its adjusted p is the smallest such a, i.e. max over j <= i of (m - j + 1) p_(j), capped at 1."""
    m = len(ps)
    srt = sorted(ps.items(), key=lambda kv: (kv[1], kv[0]))
    return {k: min(1.0, max((m - j) * srt[j][1] for j in range(i + 1))) for i, (k, _) in enumerate(srt)}


@pytest.mark.parametrize("ps", [{"a": 0.01, "b": 0.04, "c": 0.03}, {"a": 0.5}, {"a": 0.2, "b": 0.2, "c": 0.001},
                                {"x": 0.0, "y": 1.0}, {}, {"a": 0.011, "b": 0.02, "c": 0.04, "d": 0.9}])
def test_holm_matches_definition(ps):
    assert holm(ps) == pytest.approx(_holm_ref(ps), abs=1e-15)


def test_holm_known_values():
    # statsmodels.stats.multitest.multipletests([0.01, 0.04, 0.03], method="holm")[1] == [0.03, 0.06, 0.06]
    assert holm({"a": 0.01, "b": 0.04, "c": 0.03}) == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    adj = holm({"a": 0.01, "b": 0.02, "c": 0.04})
    assert [adj[k] <= 0.05 for k in "abc"] == [True, True, True]  # 0.01<=0.05/3, 0.02<=0.05/2, 0.04<=0.05
    with pytest.raises(ValueError):
        holm({"a": 1.5})


def test_paired_comparison_reports_mde():
    a = {i: i < 10 for i in range(48)}
    b = {i: i < 6 for i in range(48)}
    r = paired_comparison(a, b)
    assert r["mde"] == mcnemar_mde(48, 4 / 48)
