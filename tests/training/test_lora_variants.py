"""PEFT's LoRA variants through ``lora:`` (training/lora_variants.py), in one process: the config
checks, the PiSSA/OLoRA conversion against PEFT's own, and the LoRA+ parameter groups. The 2-process
ZeRO-3 runs of each variant are in tests/distributed/test_lora_variants.py."""
import json

import pytest
import torch

from tiny_assets import tiny_qwen2_config
from packlora.core.config import ConfigError
from packlora.core.errors import InputError
from packlora.training.config import load_config

VOCAB = 400
# tiny_qwen2_config: hidden 64, 4 heads x 16, 2 kv heads: q_proj/o_proj out 64, v_proj out 32
IDS = torch.tensor([[1, 40, 41, 42, 43, 2, 1, 50, 51, 52, 53, 54]])


def _base(seed=0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**tiny_qwen2_config(VOCAB, initializer_range=0.2)),
                                            dtype=torch.float32).eval()


@torch.no_grad()
def _logits(model):
    return model(input_ids=IDS, use_cache=False).logits


# --------------------------------------------------------------------------- the config


def test_each_variant_key_reaches_the_peft_config(run_config):
    from packlora.training.lora_variants import peft_lora_config

    cfg = load_config(run_config(**{"lora.use_dora": True, "lora.use_rslora": True, "lora.init_lora_weights": "olora",
                                    "lora.bias": "lora_only", "lora.rank_pattern": {"q_proj": 2},
                                    "lora.alpha_pattern": {"v_proj": 3}, "lora.loraplus_lr_ratio": 16}))
    peft = peft_lora_config(cfg.lora)
    assert (peft.use_dora, peft.use_rslora, peft.init_lora_weights, peft.bias) == (True, True, "olora", "lora_only")
    assert (peft.rank_pattern, peft.alpha_pattern, peft.r, peft.lora_alpha) == ({"q_proj": 2}, {"v_proj": 3}, 16, 32)
    assert cfg.lora.loraplus_lr_ratio == 16
    default = peft_lora_config(load_config(run_config()).lora)
    assert (default.use_dora, default.use_rslora, default.init_lora_weights, default.bias) == (False, False, True, "none")


def test_bad_variant_values_are_refused_naming_the_key_and_the_fix(run_config):
    with pytest.raises(ConfigError) as err:
        load_config(run_config(**{"lora.use_dora": "yes", "lora.bias": "some", "lora.init_lora_weights": "pisa",
                                  "lora.rank_pattern": {"q_proj": 0}, "lora.alpha_pattern": {"v_proj": True},
                                  "lora.loraplus_lr_ratio": 0}))
    problems = err.value.problems
    assert "lora.use_dora: must be true or false, got 'yes'" in problems
    assert "lora.bias: 'some' is not one of ['none', 'all', 'lora_only']" in problems
    assert "lora.loraplus_lr_ratio: must be a number >= 1e-09 or null, got 0" in problems
    # the rules run once the types are right
    with pytest.raises(ConfigError) as err:
        load_config(run_config(**{"lora.init_lora_weights": "pisa", "lora.rank_pattern": {"q_proj": 0},
                                  "lora.alpha_pattern": {"v_proj": True}}))
    assert err.value.problems == [
        "lora.init_lora_weights: 'pisa' is not supported; use true (the default), gaussian, pissa, olora or "
        "pissa_niter_N (N >= 1)",
        "lora.rank_pattern.q_proj: must be an integer >= 1, got 0",
        "lora.alpha_pattern.v_proj: must be a number > 0, got True",
    ]


@pytest.mark.parametrize("init, why", [
    (False, "PEFT's debugging init"),
    ("loftq", "quantises the base to 4 bits (QLoRA), which needs bitsandbytes and CUDA"),
    ("eva", "needs a pass over the training data"),
])
def test_inits_packlora_does_not_pass_are_refused_saying_why(run_config, init, why):
    with pytest.raises(ConfigError) as err:
        load_config(run_config(**{"lora.init_lora_weights": init}))
    assert len(err.value.problems) == 1
    assert err.value.problems[0].startswith(f"lora.init_lora_weights: {init!r} is not supported (")
    assert why in err.value.problems[0]


def test_fast_svd_pissa_is_accepted(run_config):
    assert load_config(run_config(**{"lora.init_lora_weights": "pissa_niter_4"})).lora.init_lora_weights == "pissa_niter_4"
    with pytest.raises(ConfigError):
        load_config(run_config(**{"lora.init_lora_weights": "pissa_niter_0"}))


def test_pissa_without_deepspeed_cannot_reload_its_checkpoints(run_config):
    with pytest.raises(ConfigError) as err:
        load_config(run_config(**{"lora.init_lora_weights": "pissa", "training.resume_from_checkpoint": "auto"}))
    assert err.value.problems[0].startswith(
        "training.resume_from_checkpoint: cannot reload a checkpoint of lora.init_lora_weights: pissa with deepspeed: null")
    assert "use deepspeed: zero2.json or zero3.json" in err.value.problems[0]
    load_config(run_config(**{"lora.init_lora_weights": "pissa", "training.resume_from_checkpoint": "auto",
                              "deepspeed": "zero3.json"}))  # DeepSpeed resumes from its own state
    load_config(run_config(**{"lora.init_lora_weights": "olora"}))  # no reload asked: fine without DeepSpeed


def test_a_fresh_init_cannot_be_combined_with_continuing_an_adapter(run_config, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(run_config(**{"init_from": str(tmp_path), "init_mode": "continue", "lora.init_lora_weights": "gaussian"}))
    assert err.value.problems == [
        "lora.init_lora_weights: 'gaussian' initialises a fresh LoRA, but init_mode: continue keeps training the "
        "stage-1 adapter; remove it, or use init_mode: merge"]


def test_loraplus_is_refused_with_a_deepspeed_json_that_brings_its_own_optimizer(run_config, tmp_path):
    from packlora.training.preflight import load_and_check

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
                              "scheduler": {"type": "WarmupLR"}}))
    with pytest.raises(ConfigError) as err:
        load_and_check(run_config(**{"deepspeed": str(ds), "lora.loraplus_lr_ratio": 16}))
    assert err.value.problems == [
        f"lora.loraplus_lr_ratio: {ds} has its own 'optimizer' section, which would ignore LoRA+'s optimizer; remove "
        "'optimizer' from it (the Trainer then builds it from training:) or drop loraplus_lr_ratio",
        f"lora.loraplus_lr_ratio: {ds} has its own 'scheduler' section, which would give every parameter group one "
        "learning rate; remove 'scheduler' from it (the Trainer then builds it from training:) or drop loraplus_lr_ratio",
    ]
    load_and_check(run_config(**{"deepspeed": "zero3.json", "lora.loraplus_lr_ratio": 16}))  # the packaged ones: fine


def test_a_pattern_that_matches_no_adapted_module_is_an_error(run_config):
    from peft import get_peft_model

    from packlora.training.lora_variants import check_patterns_matched, peft_lora_config

    lora = load_config(run_config(**{"lora.target_modules": ["q_proj"], "lora.rank_pattern": {"layers\\.1\\.self_attn\\.q_proj": 2},
                                     "lora.alpha_pattern": {"v_proj": 3}})).lora
    model = get_peft_model(_base(), peft_lora_config(lora))
    with pytest.raises(InputError) as err:
        check_patterns_matched(model, lora)
    assert str(err.value).startswith("lora.alpha_pattern: 'v_proj' matches none of the 2 adapted modules (e.g. "
                                     "model.layers.0.self_attn.q_proj, model.layers.1.self_attn.q_proj)")
    assert model.base_model.model.model.layers[1].self_attn.q_proj.lora_A["default"].weight.shape == (2, 64)


# --------------------------------------------------------------------------- what is saved


def test_expected_tensor_set_has_dora_magnitudes_and_trained_biases(run_config):
    from peft import get_peft_model

    from packlora.training.lora_variants import adapter_shapes, peft_lora_config

    lora = load_config(run_config(**{"lora.target_modules": ["q_proj", "o_proj"], "lora.r": 4, "lora.use_dora": True,
                                     "lora.bias": "lora_only"})).lora
    shapes = adapter_shapes(get_peft_model(_base(), peft_lora_config(lora)))
    want = {}
    for i in range(2):
        p = f"base_model.model.model.layers.{i}.self_attn"
        want.update({f"{p}.q_proj.lora_A.weight": (4, 64), f"{p}.q_proj.lora_B.weight": (64, 4),
                     f"{p}.q_proj.lora_magnitude_vector": (64,), f"{p}.q_proj.base_layer.bias": (64,),
                     f"{p}.o_proj.lora_A.weight": (4, 64), f"{p}.o_proj.lora_B.weight": (64, 4),
                     f"{p}.o_proj.lora_magnitude_vector": (64,)})  # o_proj has no bias in Qwen2
    assert shapes == want
    assert adapter_shapes(_base()) == {}  # lora: null: no adapter


@pytest.mark.parametrize("init, rslora", [("pissa", False), ("olora", True)])
def test_converted_pissa_and_olora_adapters_reproduce_the_trained_model_on_the_original_base(tmp_path, init, rslora):
    """Train-like change of a PiSSA/OLoRA model (A, B moved), save, convert; the converted adapter on
    the untouched base gives the mutated model's logits, and equals PEFT's own conversion."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from safetensors.torch import load_file

    from packlora.training.lora_variants import adapter_shapes, convert_to_plain_lora, converted_shapes, initial_adapter

    _base().save_pretrained(tmp_path / "base")
    from transformers import AutoModelForCausalLM

    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=init,
                     use_rslora=rslora, rank_pattern={"layers\\.0\\.self_attn\\.q_proj": 2}, alpha_pattern={"o_proj": 3},
                     task_type="CAUSAL_LM")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), cfg)
    initial = initial_adapter(model)
    peft_model_init_dir = tmp_path / "peft_init"
    model.save_pretrained(peft_model_init_dir)  # PEFT's conversion reads the initial adapter from here
    torch.manual_seed(3)
    with torch.no_grad():  # "training": move every A and B
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))
    trained = _logits(model.eval())
    shapes = converted_shapes(adapter_shapes(model))
    model.save_pretrained(tmp_path / "ckpt")
    convert_to_plain_lora(tmp_path / "ckpt", initial)

    saved = load_file(str(tmp_path / "ckpt" / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in saved.items()} == shapes
    assert saved["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 64)  # 2 x rank_pattern 2
    assert saved["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"].shape == (32, 8)
    config = json.loads((tmp_path / "ckpt" / "adapter_config.json").read_text())
    grow = 2 ** 0.5 if rslora else 2
    assert (config["r"], config["init_lora_weights"]) == (8, True)
    assert config["lora_alpha"] == pytest.approx(8 * grow)
    assert config["rank_pattern"] == {"layers\\.0\\.self_attn\\.q_proj": 4}
    assert config["alpha_pattern"]["o_proj"] == pytest.approx(3 * grow)

    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "ckpt").eval()
    torch.testing.assert_close(_logits(plain), trained, atol=1e-5, rtol=1e-5)
    if not rslora:  # PEFT refuses its conversion with rsLoRA + patterns (ours handles it: checked above)
        model.save_pretrained(tmp_path / "peft_converted", path_initial_model_for_weight_conversion=str(peft_model_init_dir))
        theirs = load_file(str(tmp_path / "peft_converted" / "adapter_model.safetensors"))
        assert theirs.keys() == saved.keys()
        for k in saved:
            torch.testing.assert_close(saved[k], theirs[k], atol=0, rtol=0)


def test_loraplus_puts_lora_b_at_ratio_times_the_learning_rate(run_config, tmp_path):
    from peft import get_peft_model
    from transformers import TrainingArguments

    from packlora.training.lora_variants import create_loraplus_optimizer, peft_lora_config

    lora = load_config(run_config(**{"lora.target_modules": ["q_proj"], "lora.r": 2, "lora.use_dora": True})).lora
    model = get_peft_model(_base(), peft_lora_config(lora))
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-3, weight_decay=0.1, report_to=[])
    opt = create_loraplus_optimizer(model, args, 16.0, torch.optim.AdamW, {"lr": 1e-3, "betas": (0.9, 0.999)})
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [(g["lr"], g["weight_decay"], sorted(names[id(p)].split(".")[-3] for p in g["params"])) for g in opt.param_groups]
    # A at lr; B and the 1-D DoRA magnitudes at 16 x lr (PEFT's grouping); weight decay on all (none is a
    # bias or a norm); PEFT's empty groups (embeddings, B without decay) dropped
    assert groups == [(1e-3, 0.1, ["lora_A", "lora_A"]),
                      (0.016, 0.1, ["lora_B", "lora_B", "lora_magnitude_vector", "lora_magnitude_vector"])]
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999)
