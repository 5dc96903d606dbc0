import math
from fractions import Fraction

import pytest

from kd.stats import Z95, mcnemar_exact, paired_comparison, wilson_interval


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
    # a wider z gives a wider interval
    assert wilson_interval(3, 10, z=2.576)[0] < wilson_interval(3, 10)[0]


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
                 "accuracy_b": 0.4, "difference": pytest.approx(0.2), "mcnemar_p": 1.0}
    with pytest.raises(ValueError, match="same questions"):
        paired_comparison(a, {1: True})
    with pytest.raises(ValueError):
        paired_comparison({}, {})
