"""Rates measured on a finite number of replies, with their 95% confidence intervals.

A runaway rate measured on n replies is a binomial proportion k/n; ``wilson_interval`` gives its
Wilson score interval (without continuity correction). Unlike the textbook Wald interval
``p +- z*sqrt(p(1-p)/n)`` it stays inside [0, 1] and does not collapse to a width of zero at
k = 0 or k = n, which is exactly where a runaway rate of "0%" has to be judged::

    >>> low, high = wilson_interval(0, 600)
    >>> low, round(high, 4)        # 0 runaways in 600 replies: still up to 0.64% at 95%
    (0.0, 0.0064)
    >>> str(Rate(6, 600))
    '1.0% [0.5, 2.2]'

Sources: E. B. Wilson, "Probable inference, the law of succession, and statistical inference",
JASA 22 (1927) 209-212; R. G. Newcombe, "Two-sided confidence intervals for the single
proportion: comparison of seven methods", Statistics in Medicine 17 (1998) 857-872 (method 3,
with worked examples in its Table I).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of the proportion ``successes / n``.

    With p = successes / n and z the standard normal quantile at ``1 - (1 - confidence) / 2``
    (1.95996 for 95%), Newcombe (1998) eq. 3::

        centre = (p + z^2 / (2n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
        (low, high) = (centre - half, centre + half)

    Args:
        successes: count of replies with the property (an int in [0, n]).
        n: count of replies (an int >= 1).
        confidence: in (0, 1).

    Returns:
        ``(low, high)``, floats in [0, 1] (``low`` is exactly 0.0 when ``successes == 0`` and
        ``high`` exactly 1.0 when ``successes == n``).

    Raises:
        ValueError: ``n < 1``, ``successes`` outside [0, n], a non-integer count, or
            ``confidence`` outside (0, 1).
    """
    for name, value in (("successes", successes), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int count, got {value!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1 (no replies, no rate), got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n={n}], got {successes}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence!r}")
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


@dataclass(frozen=True, slots=True)
class Rate:
    """``k`` of ``n`` replies, with the rate and its 95% Wilson interval (fractions in [0, 1]).

    ``str()`` gives percentages: ``"1.0% [0.5, 2.2]"`` (rate, then the interval's bounds).
    """

    k: int
    n: int

    @property
    def rate(self) -> float:
        return self.k / self.n

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    def __str__(self) -> str:
        low, high = self.interval
        return f"{100 * self.rate:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"
