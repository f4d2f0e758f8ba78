"""Best-fit-decreasing packing of segments into rows of ``max_seq_length`` tokens.

Over the whole dataset at once (not inside small chunks, as TRL's ``pack_dataset`` does per
1,000-row map batch), so rows are as full as BFD can make them. Lengths are integers in
``[1, capacity]``, so "the fullest row that still fits" is found in O(log capacity) with a
segment tree over remaining capacities, and runs of equal lengths are placed together (see
``best_fit_decreasing``): O(n log n) for the sort plus O(d log L) steps for ``d <= L`` distinct
lengths, O(n + L) memory.

Example (``capacity=8``)::

    lengths      [5, 3, 4, 2, 2]
    sorted desc   5(0) 4(2) 3(1) 2(3) 2(4)
    rows          [0, 1]  -> 5+3 = 8 (full)
                  [2, 3, 4] -> 4+2+2 = 8 (full)

    >>> best_fit_decreasing([5, 3, 4, 2, 2], 8)
    [[0, 1], [2, 3, 4]]
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


class _CapacityIndex:
    """Open rows grouped by remaining capacity ``0..capacity``; finds the smallest remaining
    capacity ``>= need`` that has an open row (the best fit) in O(log capacity).

    Rows with the same remaining capacity form a stack of numpy chunks (last pushed, first used),
    so a whole batch of rows moves between capacities in one operation."""

    def __init__(self, capacity: int):
        self.size = 1
        while self.size < capacity + 1:
            self.size *= 2
        self.count = [0] * (2 * self.size)  # leaf i (remaining capacity i) at size + i; nodes hold subtree sums
        self.stacks: dict[int, list[np.ndarray]] = {}

    def push(self, remaining: int, rows: np.ndarray) -> None:
        """Add ``rows`` (in order; the last one is used first) at ``remaining`` capacity."""
        if len(rows):
            self.stacks.setdefault(remaining, []).append(rows)
            self._bump(remaining, len(rows))

    def pop(self, remaining: int, k: int) -> np.ndarray:
        """Take the ``k`` most recently pushed rows at ``remaining``, most recent first."""
        stack, taken, need = self.stacks[remaining], [], k
        while need:
            top = stack[-1]
            if len(top) <= need:
                taken.append(top[::-1])
                need -= len(top)
                stack.pop()
            else:
                taken.append(top[: len(top) - need - 1 : -1])
                stack[-1] = top[: len(top) - need]
                need = 0
        if not stack:
            del self.stacks[remaining]
        self._bump(remaining, -k)
        return np.concatenate(taken)

    def available(self, remaining: int) -> int:
        return self.count[self.size + remaining]

    def _bump(self, i: int, delta: int) -> None:
        i += self.size
        while i:
            self.count[i] += delta
            i //= 2

    def smallest_at_least(self, need: int) -> int | None:
        """Smallest remaining capacity ``>= need`` with an open row, or None."""
        if need >= self.size:
            return None
        i = need + self.size
        if self.count[i]:
            return need
        while i > 1:  # walk up until a right sibling subtree has an open row
            if i % 2 == 0 and self.count[i + 1]:
                i += 1
                break
            i //= 2
        else:
            return None
        while i < self.size:  # descend to the leftmost non-empty leaf
            i = 2 * i if self.count[2 * i] else 2 * i + 1
        return i - self.size


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Assign items to rows so that each row's total length is ``<= capacity``.

    Exactly best-fit-decreasing (each item, longest first, goes to the fullest open row it fits
    in; ties go to the row that most recently changed), computed per *distinct length*: once an
    item of length ``n`` lands in the best-fit row with ``r`` tokens free, that row stays the best
    fit for the next ``r // n - 1`` items of the same length (nothing open has fewer free tokens
    ``>= n``), so a whole run of equal items is placed with a few numpy operations. There are at
    most ``capacity`` distinct lengths, which makes 1M items take well under a second.

    Args:
        lengths: length in tokens of each item; every one in ``[1, capacity]``.
        capacity: row size in tokens (``max_seq_length``).

    Returns:
        Rows in creation order, each a list of item indices in placement order (longest first;
        equal lengths in input order).

    Raises:
        ValueError: a length is outside ``[1, capacity]`` (handle over-long items before packing).
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    arr = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if len(arr) and (arr.min() < 1 or arr.max() > capacity):
        i = int(np.flatnonzero((arr < 1) | (arr > capacity))[0])
        raise ValueError(f"item {i} has length {arr[i]}, outside [1, {capacity}]; apply the overflow policy first")
    order = np.argsort(-arr, kind="stable")  # longest first, ties in input order
    row_of = np.empty(len(arr), dtype=np.int64)  # row of the k-th placed item
    index = _CapacityIndex(capacity)
    num_rows, pos = 0, 0
    values, counts = np.unique(arr[order], return_counts=True)
    for n, c in zip(values[::-1].tolist(), counts[::-1].tolist()):  # descending lengths
        while c:
            fit = index.smallest_at_least(n)
            per_row = (fit if fit is not None else capacity) // n  # items of length n one row takes
            if fit is None:  # open new rows
                k_rows = -(-c // per_row)
                rows = np.arange(num_rows, num_rows + k_rows)
                num_rows += k_rows
                free = capacity
            else:
                k_rows = min(index.available(fit), -(-c // per_row))
                rows = index.pop(fit, k_rows)
                free = fit
            placed = min(c, k_rows * per_row)
            row_of[pos : pos + placed] = np.repeat(rows, per_row)[:placed]
            pos += placed
            c -= placed
            last = placed - (k_rows - 1) * per_row  # items the last row got (<= per_row)
            # per-item BFD leaves the most recently filled row on top of its capacity's stack
            if free - per_row * n and k_rows > 1:
                index.push(free - per_row * n, rows[:-1])
            if free - last * n:
                index.push(free - last * n, rows[-1:])
    by_row = np.argsort(row_of, kind="stable")
    bounds = np.searchsorted(row_of[by_row], np.arange(num_rows + 1))
    placed_items = order[by_row]
    return [placed_items[bounds[r] : bounds[r + 1]].tolist() for r in range(num_rows)]


def packing_efficiency(lengths: Sequence[int], num_rows: int, capacity: int) -> float:
    """Fraction of row capacity filled with real tokens: ``sum(lengths) / (num_rows * capacity)``."""
    return sum(lengths) / (num_rows * capacity) if num_rows else 0.0
