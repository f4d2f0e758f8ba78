"""Collator: exact position_ids and labels written by hand."""
import pytest
import torch

from packlora.data_utils.collator import PackedCollator

X = -100


def test_positions_restart_and_first_label_of_every_segment_is_masked():
    rows = [
        {"input_ids": [11, 12, 13, 21, 22, 31], "labels": [11, 12, 13, 21, 22, 31], "seq_lens": [3, 2, 1]},
        {"input_ids": [41, 42, 43], "labels": [X, 42, 43], "seq_lens": [3]},
    ]
    b = PackedCollator(pad_token_id=0)(rows)
    assert set(b) == {"input_ids", "labels", "position_ids"}  # no attention_mask: positions define blocks
    assert b["input_ids"].tolist() == [[11, 12, 13, 21, 22, 31], [41, 42, 43, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 0, 1, 2]]
    assert b["labels"].tolist() == [[X, 12, 13, X, 22, X], [X, 42, 43, X, X, X]]
    assert all(t.dtype == torch.int64 and t.shape == (2, 6) for t in b.values())


def test_pad_to_multiple_of_rounds_length_up():
    b = PackedCollator(pad_token_id=7, pad_to_multiple_of=4)([{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5], "seq_lens": [5]}])
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 7, 7, 7]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert b["labels"].tolist() == [[X, 2, 3, 4, 5, X, X, X]]


def test_flash_varlen_layout_flattens_rows_and_gives_cu_seq_lens():
    rows = [
        {"input_ids": [1, 2, 3, 4], "labels": [1, 2, 3, 4], "seq_lens": [3, 1]},
        {"input_ids": [5, 6], "labels": [5, 6], "seq_lens": [2]},
    ]
    b = PackedCollator(pad_token_id=0, flash_attn_varlen=True)(rows)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1]]
    assert b["labels"].tolist() == [[X, 2, 3, X, X, 6]]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 4, 6] and b["cu_seq_lens_q"].dtype == torch.int32
    assert b["max_length_q"] == 3


def test_inconsistent_row_is_refused():
    with pytest.raises(ValueError, match="sum\\(seq_lens\\)=4, len\\(input_ids\\)=3"):
        PackedCollator(pad_token_id=0)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "seq_lens": [2, 2]}])
