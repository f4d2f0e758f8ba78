"""Config loading: overrides, every problem reported at once naming its key, unknown keys refused."""
import pytest

from packlora.training.config import ConfigError, load_config, parse_overrides
from packlora.training.preflight import deepspeed_path, resolve_deepspeed_config


@pytest.fixture
def cfg_file(run_config):
    return run_config


def test_overrides_are_typed_with_yaml_and_win_over_the_file(cfg_file):
    cfg = load_config(cfg_file(), ["training.max_steps=7", "lora.target_modules=[q_proj]", "deepspeed=zero2.json"])
    assert cfg.training == {"max_steps": 7, "report_to": []}
    assert cfg.lora.target_modules == ["q_proj"]
    assert deepspeed_path(cfg).endswith("ds_configs/zero2.json")
    assert cfg.decoding.max_new_tokens == 512
    assert cfg.decoding.stop_tokens is None  # the chat format's own: ChatFormat.default_stop_tokens


def test_all_problems_are_reported_together_each_naming_its_key(cfg_file):
    path = cfg_file(**{"lora.r": 0, "data.overflow": "truncate", "model.dtype": "fp8", "training.bf16": True,
                       "training.not_a_field": 1, "data.nope": 2, "banana": 3})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    for key in ("lora.r: must be an integer >= 1, got 0", "data.overflow: 'truncate'", "model.dtype: 'fp8'",
                "training.bf16: set by packlora; use model.dtype", "data.nope: unknown key", "banana: unknown key"):
        assert key in text
    assert len(err.value.problems) == 6


def test_a_boolean_or_unknown_choice_is_refused_naming_key_and_allowed_values(cfg_file):
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file(**{"lora.r": True, "data.chat_format": "chatlm", "data.packing": 1}))
    assert err.value.problems == [
        "lora.r: must be an integer >= 1, got True",
        "data.packing: must be true or false, got 1",
        "data.chat_format: 'chatlm' is not one of ['auto', 'chatml', 'qwen3', 'llama3', 'generic'] (did you mean 'chatml'?)",
    ]


def test_unknown_keys_get_a_did_you_mean_and_override_typos_are_blamed_on_the_command_line(cfg_file):
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file(**{"data.max_seq_lenght": 64}), ["training.max_stpes=5", "lora.alhpa=3"])
    assert err.value.problems == [
        "lora.alhpa: unknown key (did you mean 'alpha'?) (set on the command line)",
        "data.max_seq_lenght: unknown key (did you mean 'max_seq_length'?)",
    ]


def test_did_you_mean_weighs_known_synonyms_before_spelling(cfg_file):
    """``enable_reasoning`` is spelt as near ``train_reasoning`` as ``enable_thinking`` (difflib ratio
    0.71 each, and difflib offered ``train_reasoning``), but means the Qwen3 template's switch
    ``enable_thinking``; ``lr`` is ``learning_rate`` in any trainer."""
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file(**{"data.enable_reasoning": False, "data.train_thinking": False}))
    assert err.value.problems == [
        "data.enable_reasoning: unknown key (did you mean 'enable_thinking'?)",
        "data.train_thinking: unknown key (did you mean 'train_reasoning'?)",
    ]
    from packlora.training.preflight import load_and_check

    with pytest.raises(ConfigError) as err:
        load_and_check(cfg_file(**{"training.lr": 1e-4}))
    assert err.value.problems == ["training.lr: not a transformers.TrainingArguments field (did you mean 'learning_rate'?)"]


def test_missing_data_file_deepspeed_config_and_training_field_are_named_by_the_preflight(cfg_file, tmp_path):
    from packlora.training.preflight import load_and_check

    path = cfg_file(**{"data.train": [str(tmp_path / "missing.jsonl")], "deepspeed": "zero9.json",
                       "training.not_a_field": 1, "training.max_stpes": 2})
    load_config(path)  # the config itself is well formed
    with pytest.raises(ConfigError) as err:
        load_and_check(path)
    text = str(err.value)
    assert f"data.train[0]: {tmp_path / 'missing.jsonl'}: data file does not exist" in text
    assert "deepspeed: 'zero9.json' is neither a file nor one of ds_configs/ ['zero2.json', 'zero3.json']" in text
    assert "training.not_a_field: not a transformers.TrainingArguments field" in text
    assert "training.max_stpes: not a transformers.TrainingArguments field (did you mean 'max_steps'?)" in text


def test_bad_override_syntax_is_refused_naming_the_command_line():
    with pytest.raises(ConfigError, match=r"in the command line:\n  - override 'training.max_steps' must have the form "
                                          r"key.sub=value"):
        parse_overrides(["training.max_steps"])


def test_packaged_deepspeed_configs_leave_trainer_owned_values_auto():
    import json

    for name in ("zero2.json", "zero3.json"):
        ds = json.load(open(resolve_deepspeed_config(name)))
        for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
            assert ds[key] == "auto", (name, key)
        assert ds["bf16"]["enabled"] == "auto" and ds["fp16"]["enabled"] == "auto"
        assert "optimizer" not in ds and "scheduler" not in ds  # no fused_adam JIT; HF builds AdamW
    assert json.load(open(resolve_deepspeed_config("zero3.json")))["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("attn", ["flex_attention", "flash_attention_2"])
def test_backends_that_cannot_train_on_cpu_are_refused_up_front(attn):
    from packlora.training.model import check_attention_backend

    with pytest.raises(ValueError, match=f"model.attn_implementation: {attn}"):
        check_attention_backend(attn, cuda=False)
    check_attention_backend(attn, cuda=True)
    check_attention_backend("packed_sdpa", cuda=False)


def test_warmup_at_least_as_long_as_the_run_is_flagged_not_refused(cfg_file):
    from packlora.training.preflight import advice

    cfg = load_config(cfg_file(**{"training.max_steps": 10, "training.warmup_steps": 20}))
    assert advice(cfg) == ["training.warmup_steps=20 >= training.max_steps=10: the learning rate never leaves "
                           "warm-up, so the loss barely moves; lower warmup_steps (e.g. to a tenth of max_steps)"]
    assert advice(load_config(cfg_file(**{"training.max_steps": 10, "training.warmup_steps": 2}))) == []


def test_early_stopping_ends_on_the_best_checkpoint_and_needs_an_evaluation_set(cfg_file):
    from packlora.training.recipe import build_training_arguments

    with pytest.raises(ConfigError, match="early_stopping_patience: needs an evaluation set"):
        load_config(cfg_file(early_stopping_patience=2))
    cfg = load_config(cfg_file(**{"early_stopping_patience": 2, "data.eval_split": 0.5, "training.save_steps": 3}))
    args = build_training_arguments(cfg)
    assert (args.load_best_model_at_end, args.metric_for_best_model, args.eval_strategy, args.eval_steps) == (
        True, "loss", "steps", 3)


def test_lm_head_positions_default_to_supervised_and_a_chunk_size_needs_them(cfg_file):
    cfg = load_config(cfg_file())
    assert cfg.model.lm_head_positions == "supervised" and cfg.model.lm_head_chunk_tokens is None
    assert load_config(cfg_file(), ["model.lm_head_positions=all"]).model.lm_head_positions == "all"
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file(**{"model.lm_head_positions": "trained"}), ["model.lm_head_chunk_tokens=0"])
    assert err.value.problems == [
        "model.lm_head_positions: 'trained' is not one of ['supervised', 'all']",
        "model.lm_head_chunk_tokens: must be an integer >= 1 (tokens) or null, got 0 (set on the command line)",
    ]
    with pytest.raises(ConfigError, match="model.lm_head_chunk_tokens: only used with model.lm_head_positions: "
                                          "supervised"):
        load_config(cfg_file(**{"model.lm_head_positions": "all", "model.lm_head_chunk_tokens": 64}))


# ------------------------------------------------------------------ rows within the model's positions


@pytest.mark.parametrize("model, length, limit, how", [
    ({"model_type": "qwen2", "max_position_embeddings": 64}, 128, 64, "max_position_embeddings 64"),
    ({"model_type": "qwen2"}, 40000, 32768, "max_position_embeddings 32768"),  # Qwen2Config's default
    ({"model_type": "qwen2", "max_position_embeddings": 64,
      "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}},
     512, 256, "max_position_embeddings 64; rope scaling yarn: factor 4.0 x 64 = 256"),
    ({"model_type": "llama", "max_position_embeddings": 256,  # Llama-3.1's shape: the scaling is inside the limit
      "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16,
                       "low_freq_factor": 1.0, "high_freq_factor": 4.0}},
     300, 256, "max_position_embeddings 256; rope scaling llama3: factor 8.0 x 16 = 128"),
], ids=["max_position_embeddings", "model_type-default", "yarn", "llama3"])
def test_rows_longer_than_the_models_positions_are_refused_with_both_numbers(cfg_file, model, length, limit, how):
    from packlora.training.preflight import load_and_check

    with pytest.raises(ConfigError) as err:
        load_and_check(cfg_file(**{"model.config": model, "data.max_seq_length": length}), training_arguments=False)
    [problem] = err.value.problems
    assert problem.startswith(f"data.max_seq_length: {length} tokens per row, but the model (model.config")
    assert f"has positions for {limit} tokens ({how})" in problem
    assert f"Set data.max_seq_length <= {limit}" in problem
    load_and_check(cfg_file(**{"model.config": model, "data.max_seq_length": limit}), training_arguments=False)


def test_a_model_directorys_rope_scaling_is_read_from_its_config_json(cfg_file, tmp_path, chatml_tokenizer_dir):
    """Qwen2.5's documented long-context setting: YaRN factor 4 over 32768 positions = 131072."""
    import json

    from packlora.training.preflight import load_and_check

    model_dir = tmp_path / "qwen2.5"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "max_position_embeddings": 32768,
        "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}))
    changes = {"model.config": None, "model.name_or_path": str(model_dir), "model.tokenizer": str(chatml_tokenizer_dir)}
    load_and_check(cfg_file(**changes, **{"data.max_seq_length": 131072}), training_arguments=False)
    with pytest.raises(ConfigError) as err:
        load_and_check(cfg_file(**changes, **{"data.max_seq_length": 131073}), training_arguments=False)
    [problem] = err.value.problems
    assert (f"data.max_seq_length: 131073 tokens per row, but the model (model.name_or_path {model_dir}) has "
            "positions for 131072 tokens (max_position_embeddings 32768; rope scaling yarn: factor 4.0 x 32768 = "
            "131072)") in problem
