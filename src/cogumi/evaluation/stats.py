"""Small-sample statistics for evaluation counts, written with ``math`` only.

Features:
  * ``wilson_interval(k, n)``: the 95% Wilson score interval for a proportion (good at small n and
    at 0% / 100%, where the normal "Wald" interval collapses to a point);
  * ``wilson_half_width(k, n)``: half its width, e.g. about 0.13 for 35/50 -- "n=50 gives about +/-13
    points", which the gates compare with a band's width;
  * ``n_for_half_width(p, h)``: how many items make the interval that narrow;
  * ``mcnemar_exact(b, c)``: the exact McNemar test on discordant pairs, i.e. a two-sided binomial sign
    test with p=1/2 (``sign_test`` is the same function under its other name).

Why not scipy/statsmodels: neither is installed, and these are a few lines each. The exact binomial
tail is summed in integers (``math.comb``) and divided once, so it does not underflow for large n.
Tests check the functions against published values (statsmodels' ``proportion_confint(method="wilson")``
and ``mcnemar(exact=True)``).

Failure modes: n = 0 gives the uninformative interval (0, 1) and p = 1.0; negative counts or
k > n raise ``ValueError``.
"""

from __future__ import annotations

import math
from fractions import Fraction

Z95 = 1.959963984540054  # the 97.5th percentile of the standard normal


def _check_counts(k: int, n: int) -> None:
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials (95% by default)."""
    _check_counts(k, n)
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # Clamp rounding noise: the exact interval touches 0 when k == 0 and 1 when k == n.
    low = 0.0 if k == 0 else max(0.0, center - half)
    high = 1.0 if k == n else min(1.0, center + half)
    return (low, high)


def wilson_half_width(k: int, n: int, z: float = Z95) -> float:
    low, high = wilson_interval(k, n, z)
    return (high - low) / 2


def n_for_half_width(p: float, half_width: float, z: float = Z95) -> int:
    """Items needed for a 95% interval of about +/-half_width around proportion p (normal approx.)."""
    if half_width <= 0:
        raise ValueError("half_width must be positive")
    p = min(max(p, 0.05), 0.95)  # near 0/1 the normal formula promises too little; stay conservative
    return math.ceil(z * z * p * (1 - p) / (half_width * half_width))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts b and c.

    Under H0 each discordant pair goes either way with probability 1/2, so min(b, c) is
    Binomial(b + c, 1/2); the two-sided p-value doubles the smaller tail (exact, as the
    distribution is symmetric) and caps it at 1.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** n)))


sign_test = mcnemar_exact


def rate(k: int, n: int) -> float | None:
    return k / n if n else None
