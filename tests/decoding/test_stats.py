"""The Wilson score interval on values worked out by hand and published in Newcombe (1998)."""
from __future__ import annotations

import math

import pytest

from packlora.decoding.stats import Rate, wilson_interval


# Newcombe, "Two-sided confidence intervals for the single proportion: comparison of seven
# methods", Statistics in Medicine 17 (1998) 857-872, Table I, method 3 (score, no continuity
# correction), 95%, printed to 4 decimals.
@pytest.mark.parametrize("k, n, low, high", [
    (81, 263, 0.2553, 0.3662),
    (15, 148, 0.0624, 0.1605),
    (0, 20, 0.0000, 0.1611),
    (1, 29, 0.0061, 0.1718),
])
def test_wilson_interval_matches_newcombes_table(k, n, low, high):
    got = wilson_interval(k, n)
    assert got == pytest.approx((low, high), abs=5e-5)


def test_zero_successes_has_the_closed_form_upper_bound_z2_over_n_plus_z2():
    # k = 0: the centre and half-width are equal, so low = 0 and high = z^2 / (n + z^2).
    z = 1.959963984540054  # the 97.5% normal quantile
    for n in (1, 10, 200, 600):
        assert wilson_interval(0, n) == (0.0, pytest.approx(z * z / (n + z * z), rel=1e-12))
    assert wilson_interval(0, 600)[1] == pytest.approx(0.006362, abs=1e-6)  # 3.8415 / 603.8415


def test_all_successes_mirror_zero_successes():
    low, high = wilson_interval(200, 200)
    assert high == 1.0 and low == pytest.approx(1 - wilson_interval(0, 200)[1], rel=1e-12)


def test_half_successes_are_symmetric_about_one_half():
    # k = n/2: centre 1/2, half = z / (1 + z^2/n) * sqrt(1/(4n) + z^2/(4n^2)) = z / (2 sqrt(n + z^2)).
    z = 1.959963984540054
    low, high = wilson_interval(50, 100)
    half = z / (2 * math.sqrt(100 + z * z))
    assert (low, high) == (pytest.approx(0.5 - half, rel=1e-12), pytest.approx(0.5 + half, rel=1e-12))
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=5e-5)


def test_other_confidence_levels_use_their_own_quantile():
    # 90%: z = 1.6448536...; k = 0 -> high = z^2 / (n + z^2) = 2.70554 / 22.70554
    assert wilson_interval(0, 20, confidence=0.90)[1] == pytest.approx(0.119158, abs=1e-6)


def test_rate_prints_percent_and_interval():
    assert str(Rate(6, 600)) == "1.0% [0.5, 2.2]"
    assert Rate(0, 600).rate == 0.0 and str(Rate(0, 600)) == "0.0% [0.0, 0.6]"


@pytest.mark.parametrize("k, n, message", [
    (1, 0, "n must be >= 1"), (5, 4, r"successes must be in \[0, n=4\], got 5"), (-1, 4, "successes must be in"),
    (0.5, 4, "successes must be an int count"), (True, 4, "successes must be an int count"),
])
def test_bad_counts_raise_naming_the_value(k, n, message):
    with pytest.raises(ValueError, match=message):
        wilson_interval(k, n)


def test_confidence_outside_zero_one_raises():
    with pytest.raises(ValueError, match="confidence must be in"):
        wilson_interval(1, 2, confidence=95)
