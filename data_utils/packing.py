"""Best-fit-decreasing packing of segments into rows of ``max_seq_length`` tokens.

Over the whole dataset at once (not inside small chunks, as TRL's ``pack_dataset`` does per
1,000-row map batch), so rows are as full as BFD can make them. Lengths are integers in
``[1, capacity]``, so "the fullest row that still fits" is found in O(log capacity) with a
segment tree over remaining capacities; packing ``n`` segments costs O(n log n + n log L) time
and O(n + L) memory.

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


class _CapacityIndex:
    """Count of open rows per remaining capacity ``0..capacity``; finds the smallest capacity
    ``>= need`` that has an open row (the best fit) in O(log capacity)."""

    def __init__(self, capacity: int):
        self.size = 1
        while self.size < capacity + 1:
            self.size *= 2
        self.count = [0] * (2 * self.size)  # leaf i (remaining capacity i) at size + i; nodes hold subtree sums
        self.rows: list[list[int]] = [[] for _ in range(capacity + 1)]

    def add(self, remaining: int, row: int) -> None:
        self.rows[remaining].append(row)
        self._bump(remaining, +1)

    def pop(self, remaining: int) -> int:
        self._bump(remaining, -1)
        return self.rows[remaining].pop()

    def _bump(self, i: int, delta: int) -> None:
        i += self.size
        while i:
            self.count[i] += delta
            i //= 2

    def smallest_at_least(self, need: int) -> int | None:
        """Smallest remaining capacity ``>= need`` with an open row, or None."""
        if need >= self.size:
            return None
        # Walk up from leaf `need`, looking for the first non-empty subtree to the right.
        i = need + self.size
        if self.count[i]:
            return need
        while i > 1:
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

    Args:
        lengths: length in tokens of each item; every one in ``[1, capacity]``.
        capacity: row size in tokens (``max_seq_length``).

    Returns:
        Rows in creation order, each a list of item indices in placement order (longest first).

    Raises:
        ValueError: a length is outside ``[1, capacity]`` (handle over-long items before packing).
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    for i, n in enumerate(lengths):
        if not 1 <= n <= capacity:
            raise ValueError(f"item {i} has length {n}, outside [1, {capacity}]; apply the overflow policy first")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep input order
    index = _CapacityIndex(capacity)
    rows: list[list[int]] = []
    for i in order:
        n = lengths[i]
        fit = index.smallest_at_least(n)
        if fit is None:
            rows.append([i])
            row, remaining = len(rows) - 1, capacity - n
        else:
            row = index.pop(fit)
            rows[row].append(i)
            remaining = fit - n
        if remaining > 0:
            index.add(remaining, row)
    return rows


def packing_efficiency(lengths: Sequence[int], num_rows: int, capacity: int) -> float:
    """Fraction of row capacity filled with real tokens: ``sum(lengths) / (num_rows * capacity)``."""
    return sum(lengths) / (num_rows * capacity) if num_rows else 0.0
