"""The options the behaviour-boundary experiment needs: ``data.labels: legacy_full_sequence``
(whole chat trained, packed without isolation), ``lora: null`` (full-parameter training) and the
``runaway_eval`` callback settings."""
from __future__ import annotations

import pytest
import torch
from tiny_assets import IM_END, IM_START

from packlora.data_utils.collator import PackedCollator
from packlora.data_utils.chat_format import ChatFormat
from packlora.data_utils.types import IGNORE_INDEX
from packlora.training.config import ConfigError, config_from_dict

CHAT = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi"}]


def test_legacy_labels_cover_role_markers_that_assistant_only_masks(chatml_tokenizer):
    fmt = ChatFormat(chatml_tokenizer)
    legacy_ids = tuple(fmt.encode_full(CHAT))  # legacy_full_sequence: labels = these ids, all of them
    [sound] = fmt.encode_chat(CHAT).examples
    assert legacy_ids == sound.input_ids
    legacy = type(sound)(legacy_ids, legacy_ids)
    assert legacy.labels.count(IM_START) == 3  # system (default), user, assistant headers
    assert IM_START not in [t for t in sound.labels if t != IGNORE_INDEX]
    assert sum(t == IM_END for t in sound.labels) == 1  # only the assistant's end of turn


def test_collator_without_isolation_runs_positions_on_and_keeps_first_labels():
    rows = [{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "seq_lens": [3, 2]}]
    legacy = PackedCollator(pad_token_id=0, isolate_segments=False)(rows + [
        {"input_ids": [4, 4], "labels": [4, 4], "seq_lens": [2]}])
    assert legacy["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert legacy["labels"].tolist() == [[5, 6, 7, 8, 9], [4, 4, -100, -100, -100]]
    isolated = PackedCollator(pad_token_id=0)(rows)
    assert isolated["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert isolated["labels"].tolist() == [[-100, 6, 7, -100, 9]]


def test_collator_refuses_flash_varlen_without_isolation():
    with pytest.raises(ValueError, match="cannot be combined with isolate_segments=False"):
        PackedCollator(pad_token_id=0, flash_attn_varlen=True, isolate_segments=False)(
            [{"input_ids": [1, 2], "labels": [1, 2], "seq_lens": [2]}])


@pytest.fixture
def raw(run_config):
    return run_config.dict()


def test_lora_null_means_full_parameter_training(raw):
    assert config_from_dict({**raw, "lora": None}).lora is None
    assert config_from_dict(raw).lora.r == 16  # absent: the default LoRA


def test_labels_and_runaway_eval_are_validated_naming_the_key(raw):
    with pytest.raises(ConfigError) as e:
        config_from_dict({**raw, "data": {**raw["data"], "labels": "everything"},
                          "runaway_eval": {"every_steps": 5, "num_prompts": 0}})
    text = str(e.value)
    assert "data.labels: 'everything' is not one of ['assistant_only', 'legacy_full_sequence']" in text
    assert "runaway_eval.num_prompts: must be an integer >= 1, got 0" in text
    with pytest.raises(ConfigError, match="runaway_eval.every_steps: needs held-out prompts; set data.eval_holdout >= 1"):
        config_from_dict({**raw, "runaway_eval": {"every_steps": 5}})  # cross-key rules, once every value is typed
    cfg = config_from_dict({**raw, "data": {**raw["data"], "labels": "legacy_full_sequence", "eval_holdout": 1},
                            "runaway_eval": {"every_steps": 5}})
    assert (cfg.data.labels, cfg.runaway_eval.every_steps, cfg.runaway_eval.num_prompts) == (
        "legacy_full_sequence", 5, 4)


def test_full_parameter_model_trains_every_weight(tmp_path, chatml_tokenizer):
    from transformers import AutoConfig, AutoModelForCausalLM

    from tiny_assets import tiny_qwen2_config
    from packlora.training.config import ModelConfig
    from packlora.training.model import build_model

    AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_qwen2_config(len(chatml_tokenizer)))).save_pretrained(
        tmp_path / "base")
    model = build_model(str(tmp_path / "base"), ModelConfig(name_or_path=str(tmp_path / "base")), None, seed=0)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert all(p.requires_grad for p in model.parameters())
    assert model.config.use_cache is False and isinstance(next(model.parameters()), torch.nn.Parameter)
