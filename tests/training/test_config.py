"""Config loading: overrides, every problem reported at once naming its key, unknown keys refused."""
import pytest
import yaml

from training.config import ConfigError, load_config, parse_overrides, resolve_deepspeed_config


@pytest.fixture
def cfg_file(tmp_path, chatml_tokenizer_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')

    def write(**changes):
        cfg = {
            "output_dir": str(tmp_path / "out"),
            "model": {"config": {"model_type": "qwen2"}, "tokenizer": str(chatml_tokenizer_dir)},
            "data": {"train": [str(data)], "max_seq_length": 64},
            "training": {"max_steps": 3},
        }
        for key, value in changes.items():
            node = cfg
            *parents, last = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[last] = value
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    return write


def test_overrides_are_typed_with_yaml_and_win_over_the_file(cfg_file):
    cfg = load_config(cfg_file(), ["training.max_steps=7", "lora.target_modules=[q_proj]", "deepspeed=zero2.json"])
    assert cfg.training == {"max_steps": 7}
    assert cfg.lora.target_modules == ["q_proj"]
    assert cfg.deepspeed_path().endswith("ds_configs/zero2.json")
    assert cfg.decoding.max_new_tokens == 512
    assert cfg.decoding.stop_tokens == ["<|im_end|>", "<|endoftext|>"]


def test_all_problems_are_reported_together_each_naming_its_key(cfg_file):
    path = cfg_file(**{"lora.r": 0, "data.overflow": "truncate", "model.dtype": "fp8", "training.bf16": True,
                       "training.not_a_field": 1, "data.nope": 2, "banana": 3})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    for key in ("lora.r: must be an integer >= 1, got 0", "data.overflow: 'truncate'", "model.dtype: 'fp8'",
                "training.bf16: set by packlora; use model.dtype", "training.not_a_field: not a transformers",
                "data.nope: unknown key", "banana: unknown key"):
        assert key in text
    assert len(err.value.problems) == 7


def test_missing_data_file_and_deepspeed_config_are_named(cfg_file, tmp_path):
    path = cfg_file(**{"data.train": [str(tmp_path / "missing.jsonl")], "deepspeed": "zero9.json"})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "missing.jsonl' does not exist" in str(err.value)
    assert "deepspeed: 'zero9.json' is neither a file nor one of ds_configs/ ['zero2.json', 'zero3.json']" in str(err.value)


def test_bad_override_syntax_is_refused():
    with pytest.raises(ConfigError, match="'training.max_steps' is not of the form key.sub=value"):
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
    from training.model import check_attention_backend

    with pytest.raises(ValueError, match=f"model.attn_implementation: {attn}"):
        check_attention_backend(attn, cuda=False)
    check_attention_backend(attn, cuda=True)
    check_attention_backend("packed_sdpa", cuda=False)
