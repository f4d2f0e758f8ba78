"""Cutting a generated row at its first stop id. (Which ids stop a reply: tests/data_utils/test_chat_format.py.)"""
from __future__ import annotations

import doctest

import packlora.decoding.stopping
from packlora.decoding.stopping import cut_at_first_stop


def test_cut_keeps_tokens_before_the_first_stop_only():
    assert cut_at_first_stop([7, 8, 0, 9, 2], [2, 0]) == ((7, 8), 0)
    assert cut_at_first_stop([2, 7], [2]) == ((), 2)
    assert cut_at_first_stop([], [2]) == ((), None)


def test_docstring_examples():
    result = doctest.testmod(packlora.decoding.stopping)
    assert result.attempted >= 2 and result.failed == 0
