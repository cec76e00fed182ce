"""Wilson intervals and the exact McNemar test against published values."""

import math

import pytest

from cogumi.evaluation.stats import mcnemar_exact, n_for_half_width, sign_test, wilson_half_width, wilson_interval


@pytest.mark.parametrize("k,n,low,high", [
    # Newcombe (1998), Statistics in Medicine 17:857-872, Table I, method 3 (score, no continuity correction)
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0, 0.1611),
    (1, 29, 0.0061, 0.1718),
    # statsmodels proportion_confint(k, n, method="wilson")
    (5, 10, 0.2366, 0.7634),
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
])
def test_wilson_matches_published_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=5e-5)
    assert hi == pytest.approx(high, abs=5e-5)


def test_wilson_edges_and_errors():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(6, 5)
    with pytest.raises(ValueError):
        wilson_interval(-1, 5)


def test_n50_gives_about_13_points():
    # The user's plan: 50 GSM8K items. At 70% ties the 95% interval is about +/-12 points, at 50% +/-13.
    assert wilson_half_width(35, 50) == pytest.approx(0.123, abs=0.002)
    assert wilson_half_width(25, 50) == pytest.approx(0.134, abs=0.002)
    # ... and a 20-point band needs about 81 items for +/-10 points.
    assert n_for_half_width(0.7, 0.10) == 81


@pytest.mark.parametrize("b,c,p", [
    (1, 9, 0.021484375),     # statsmodels mcnemar([[., 1], [9, .]], exact=True).pvalue; 2 * 11 / 1024
    (0, 5, 0.0625),          # 2 * (1/2)^5
    (3, 12, 0.03515625),     # 2 * (1 + 15 + 105 + 455) / 2^15
    (5, 5, 1.0),
    (0, 0, 1.0),
    (0, 1, 1.0),
])
def test_mcnemar_exact_known_values(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)
    assert mcnemar_exact(c, b) == pytest.approx(p, rel=1e-12)
    assert sign_test(b, c) == mcnemar_exact(b, c)


def _two_sided_minlike(b, c):
    """Independent definition: the probability of every outcome no more likely than the observed one."""
    n = b + c
    probs = [math.comb(n, i) / 2 ** n for i in range(n + 1)]
    observed = probs[b]
    return min(1.0, sum(p for p in probs if p <= observed * (1 + 1e-12)))


@pytest.mark.parametrize("b,c", [(2, 7), (10, 25), (150, 86), (40, 41), (0, 30)])
def test_mcnemar_equals_the_minlike_definition(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(_two_sided_minlike(b, c), rel=1e-9)


def test_mcnemar_large_counts_do_not_underflow():
    # Summed in integers: a float loop over 0.5**4600 would underflow to 0.
    assert 0 < mcnemar_exact(2000, 2600) < 1e-15
    assert mcnemar_exact(2000, 2001) == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)
