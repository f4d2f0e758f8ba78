"""Best-fit-decreasing over the whole dataset."""
import random

import pytest

from packlora.data_utils.packing import best_fit_decreasing, packing_efficiency


def test_bfd_fills_rows_exactly_when_items_fit_perfectly():
    assert best_fit_decreasing([5, 3, 4, 2, 2], 8) == [[0, 1], [2, 3, 4]]


def test_bfd_puts_an_item_in_the_fullest_row_that_still_fits():
    # 7 -> row 0 (3 free); 6 -> row 1 (4 free); the first 3 goes to row 0, which it fills exactly,
    # not to the emptier row 1 (worst fit would); the last 3 then goes to row 1.
    assert best_fit_decreasing([7, 6, 3, 3], 10) == [[0, 2], [1, 3]]


def test_every_item_is_placed_once_and_no_row_overflows():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(5000)]
    rows = best_fit_decreasing(lengths, 512)
    placed = sorted(i for r in rows for i in r)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 512 for r in rows)
    # whole-set BFD on uniform lengths packs nearly perfectly; the lower bound is ceil(sum/512)
    lower = -(-sum(lengths) // 512)
    assert len(rows) <= lower * 1.01 + 1
    assert packing_efficiency(lengths, len(rows), 512) > 0.98


def _naive_bfd(lengths, cap):
    """Quadratic per-item best-fit-decreasing: the fullest row that fits, ties to the row that
    changed most recently (the rule best_fit_decreasing documents)."""
    rows, free, changed, clock = [], [], [], 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fits = [r for r in range(len(rows)) if free[r] >= lengths[i]]
        if fits:
            r = min(fits, key=lambda r: (free[r], -changed[r]))
        else:
            rows.append([])
            free.append(cap)
            changed.append(0)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= lengths[i]
        clock += 1
        changed[r] = clock
    return rows


@pytest.mark.parametrize("seed", range(6))
def test_grouped_bfd_places_every_item_exactly_like_per_item_bfd(seed):
    rng = random.Random(seed)
    cap = rng.choice([10, 64, 100])
    lengths = [rng.randint(1, cap) for _ in range(rng.randint(1, 400))]
    assert best_fit_decreasing(lengths, cap) == _naive_bfd(lengths, cap)


@pytest.mark.parametrize("bad", [0, 9])
def test_length_outside_capacity_is_refused(bad):
    with pytest.raises(ValueError, match=f"item 1 has length {bad}"):
        best_fit_decreasing([3, bad], 8)
