"""``CheckpointInfo.read``: one read of a checkpoint's small files, and what is derived from them."""
from __future__ import annotations

import json

import pytest
import yaml

from packlora.core.checkpoint import CheckpointInfo
from packlora.core.errors import InputError, MissingPathError, PackloraError


def _checkpoint(root, **files):
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        name = name.replace("__", ".")
        (root / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return root


def test_an_adapter_checkpoint_gives_its_format_stop_tokens_length_limit_step_and_moved_base(tmp_path):
    run = tmp_path / "moved-run"
    _checkpoint(run / "base_model", config__json={"model_type": "qwen2"})
    ckpt = _checkpoint(
        run / "checkpoint-6",
        adapter_config__json={"base_model_name_or_path": "/where/the/run/was/base_model", "r": 4},
        generation_config__json={"eos_token_id": [151645, 151643], "max_new_tokens": 99},
        packlora_config__yaml=yaml.safe_dump({"data": {"chat_format": "qwen3", "enable_thinking": False},
                                              "decoding": {"stop_tokens": ["<|im_end|>"], "max_new_tokens": 64}}),
        packlora_complete__json={"global_step": 6},
    )
    info = CheckpointInfo.read(ckpt)
    assert (info.is_adapter, info.global_step, info.adapter_config["r"]) == (True, 6, 4)
    assert info.format_options == {"name": "qwen3", "enable_thinking": False, "train_reasoning": True}
    assert info.stop_tokens == ["<|im_end|>"]
    assert info.max_new_tokens() == 64  # the run config's, before generation_config.json's 99
    assert info.base_model_path() == run / "base_model"  # not the recorded path: the run was moved


def test_a_full_model_without_packlora_files_has_defaults(tmp_path):
    info = CheckpointInfo.read(_checkpoint(tmp_path / "m", config__json={"model_type": "qwen2"}))
    assert (info.is_adapter, info.run_config, info.generation_config, info.global_step) == (False, {}, {}, None)
    assert info.format_options == {"name": "auto", "enable_thinking": None, "train_reasoning": True}
    assert info.max_new_tokens() == 512 and info.base_model_path() is None


def test_a_directory_that_is_not_a_checkpoint_and_damaged_files_are_packlora_errors_naming_the_file(tmp_path):
    with pytest.raises(MissingPathError, match="neither adapter_config.json .* nor config.json"):
        CheckpointInfo.read(tmp_path)
    _checkpoint(tmp_path, config__json="{}", generation_config__json='{"eos_token_id": [1,')
    with pytest.raises(InputError, match=r"generation_config.json: not valid JSON"):
        CheckpointInfo.read(tmp_path)
    _checkpoint(tmp_path, generation_config__json="{}", packlora_config__yaml="decoding: [1, 2]\n")
    with pytest.raises(InputError, match=r"packlora_config.yaml: must be a mapping whose 'decoding' is a mapping"):
        CheckpointInfo.read(tmp_path)
    _checkpoint(tmp_path, packlora_config__yaml="decoding: {max_new_tokens: -1}\n")
    with pytest.raises(PackloraError, match="max_new_tokens in .* is -1"):
        CheckpointInfo.read(tmp_path).max_new_tokens()
