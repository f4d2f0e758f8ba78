"""Best-fit-decreasing over the whole dataset."""
import random

import pytest

from data_utils.packing import best_fit_decreasing, packing_efficiency


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


def test_matches_a_naive_bfd_reference():
    """The segment tree must pick the same rows as a quadratic best-fit scan."""
    rng = random.Random(1)
    lengths = [rng.randint(1, 64) for _ in range(400)]

    def naive(lengths, cap):
        rows, free = [], []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            fits = [(free[r], r) for r in range(len(rows)) if free[r] >= lengths[i]]
            if fits:
                # smallest free capacity; among equals the most recently opened-or-updated row is
                # taken by the tree (LIFO per capacity), so compare row totals instead of identities
                _, r = min(fits)
                rows[r].append(i)
                free[r] -= lengths[i]
            else:
                rows.append([i])
                free.append(cap - lengths[i])
        return rows

    ours, ref = best_fit_decreasing(lengths, 100), naive(lengths, 100)
    assert len(ours) == len(ref)
    assert sorted(sum(lengths[i] for i in r) for r in ours) == sorted(sum(lengths[i] for i in r) for r in ref)


@pytest.mark.parametrize("bad", [0, 9])
def test_length_outside_capacity_is_refused(bad):
    with pytest.raises(ValueError, match=f"item 1 has length {bad}"):
        best_fit_decreasing([3, bad], 8)
