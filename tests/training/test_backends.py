"""The attention-backend table (``training/backends.py``) is what the config rules, the machine check,
the collator layout and the isolation guard follow."""
from __future__ import annotations

import pytest
import torch

from packlora.core.config import ConfigError
from packlora.training.backends import BACKENDS, cannot_train_here
from packlora.training.config import config_from_dict
from packlora.training.isolation import PackedInputError, check_packed_inputs


def test_the_table_knows_which_backends_train_on_cpu_and_which_flatten_the_batch():
    assert [n for n, s in BACKENDS.items() if s.trains_on_cpu] == ["sdpa", "packed_sdpa", "eager"]
    assert [n for n, s in BACKENDS.items() if s.flattened_batch] == ["varlen", "flash_attention_2"]
    assert [n for n, s in BACKENDS.items() if s.half_precision_only] == ["varlen", "flash_attention_2"]


@pytest.mark.parametrize("name", list(BACKENDS))
def test_config_refuses_float32_and_legacy_labels_where_the_table_says(name, run_config):
    spec = BACKENDS[name]
    float32 = run_config.dict(**{"model.attn_implementation": name, "model.dtype": "float32"})
    legacy = run_config.dict(**{"model.attn_implementation": name, "model.dtype": "bfloat16",
                                "data.labels": "legacy_full_sequence"})
    for raw, refused, key in ((float32, spec.half_precision_only, "model.dtype: float32"),
                              (legacy, spec.isolates_by_construction, "data.labels: legacy_full_sequence")):
        if refused:
            with pytest.raises(ConfigError, match=key):
                config_from_dict(raw)
        else:
            config_from_dict(raw)


@pytest.mark.parametrize("name", list(BACKENDS))
def test_machine_check_refuses_on_cpu_exactly_the_backends_that_cannot_train_there(name):
    reason = cannot_train_here(name, cuda=False)
    assert (reason is None) == BACKENDS[name].trains_on_cpu
    if reason:
        assert reason.startswith(f"model.attn_implementation: {name} ") and "use packed_sdpa" in reason
    assert cannot_train_here(name, cuda=True) is None  # this torch has the varlen kernel


def test_isolation_guard_wants_cu_seq_lens_for_several_rows_only_where_rows_are_not_isolated_by_position():
    two_packed_rows = {"input_ids": torch.zeros(2, 4, dtype=torch.long),
                       "position_ids": torch.tensor([[0, 1, 0, 1], [0, 1, 2, 0]]), "use_cache": False}
    for name, spec in BACKENDS.items():
        if spec.rows_isolated_from_positions:
            check_packed_inputs(dict(two_packed_rows), name)
        else:
            with pytest.raises(PackedInputError, match="has 2 rows and no cu_seq_lens_q"):
                check_packed_inputs(dict(two_packed_rows), name)
