"""PEFT's LoRA variants (``lora:``) trained for 2 steps by 2 DeepSpeed ZeRO-3 processes on CPU (gloo,
fp32, ``stage3_param_persistence_threshold: 0`` so that every tensor is partitioned), then reloaded
the way ``packlora decode`` loads a checkpoint and merged by ``packlora export``.

Three runs of compatible variants, plus the first one again under ZeRO-2:

    dora    use_dora + use_rslora + init gaussian + bias lora_only + rank_pattern + alpha_pattern + LoRA+ (x4)
    pissa   init pissa + bias all + rank_pattern + alpha_pattern          (saved converted: rank 2r)
    olora   init olora + use_dora + use_rslora                            (saved converted: rank 2r)

Each test checks one property: ZeRO-3 computes what ZeRO-2 does (DoRA reads the base weight outside
the base layer's forward), the saved tensor set is exact (DoRA magnitudes, biases, per-module ranks),
``adapter_config.json`` names the variant, the reload equals an independent computation (1e-5),
the merged export equals the reload (1e-4), LoRA+ moved B at 4x the rate and gaussian drew A with
std 1/r. About 4 minutes on 2 cores.

    python -m pytest -m distributed tests/distributed/test_lora_variants_distributed.py -q
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from launching import launch
from tiny_assets import SHISHUO_CHATS, build_chatml_tokenizer, tiny_qwen2_config

pytestmark = pytest.mark.distributed

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB, LAYERS, SEED = 400, 2, 0
LR, LORAPLUS = 1e-2, 4.0
TARGETS = ["q_proj", "v_proj", "o_proj"]
Q0 = "layers\\.0\\.self_attn\\.q_proj"  # rank_pattern: layer 0's q_proj at rank 2
LORA = {
    "dora": {"use_dora": True, "use_rslora": True, "init_lora_weights": "gaussian", "bias": "lora_only",
             "rank_pattern": {Q0: 2}, "alpha_pattern": {"o_proj": 3}, "loraplus_lr_ratio": LORAPLUS},
    "pissa": {"init_lora_weights": "pissa", "bias": "all", "rank_pattern": {Q0: 2}, "alpha_pattern": {"o_proj": 3}},
    "olora": {"init_lora_weights": "olora", "use_dora": True, "use_rslora": True},
}
R, ALPHA = 4, 8
# tiny_qwen2_config: hidden 64, 4 heads x 16 -> q_proj and o_proj out 64; 2 kv heads -> v_proj out 32
OUT = {"q_proj": 64, "v_proj": 32, "o_proj": 64}
# Scale of each module's update, written out (not computed like PEFT does):
#   dora (rsLoRA, alpha / sqrt(r)): layer-0 q_proj 8 / sqrt(2); other q/v 8 / sqrt(4) = 4; o_proj 3 / sqrt(4) = 1.5
DORA_SCALE = {("q_proj", 0): 5.656854249492381, ("q_proj", 1): 4.0, ("v_proj", 0): 4.0, ("v_proj", 1): 4.0,
              ("o_proj", 0): 1.5, ("o_proj", 1): 1.5}
PROBE = [{"role": "user", "content": "请把下面这段现代文改写成文言：王戎七岁时，和小孩们一起游玩。"},
         {"role": "assistant", "content": "王戎七岁，尝与诸小儿游。"}]


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("lora_variants")
    build_chatml_tokenizer(ws / "tokenizer", vocab_size=VOCAB)
    lines = SHISHUO_CHATS.read_text(encoding="utf-8").splitlines()[:24]
    (ws / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = json.loads((REPO_ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the tiny LoRA tensors
    (ws / "zero3_partition_all.json").write_text(json.dumps(ds, indent=1))
    return ws


def _config(ws: Path, variant: str) -> Path:
    cfg = {
        "output_dir": str(ws / "unused"), "seed": SEED, "deepspeed": str(ws / "zero3_partition_all.json"),
        "model": {"config": tiny_qwen2_config(VOCAB, initializer_range=0.2), "tokenizer": str(ws / "tokenizer"),
                  "attn_implementation": "sdpa"},
        "lora": {"r": R, "alpha": ALPHA, "dropout": 0.0, "target_modules": TARGETS, **LORA[variant]},
        "data": {"train": [str(ws / "chats.jsonl")], "max_seq_length": 512, "overflow": "drop",
                 "cache_dir": str(ws / "cache")},
        "training": {"max_steps": 2, "learning_rate": LR, "lr_scheduler_type": "constant",
                     "per_device_train_batch_size": 1, "save_steps": 2, "report_to": []},
        "decoding": {"max_new_tokens": 8},
    }
    path = ws / f"{variant}.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run(workspace):
    """``run(variant, stage="zero3")`` -> output_dir, launched on first use."""
    done: dict[tuple[str, str], Path] = {}

    def get(variant: str, stage: str = "zero3") -> Path:
        if (variant, stage) not in done:
            out = workspace / f"{variant}-{stage}"
            extra = ["deepspeed=zero2.json"] if stage == "zero2" else []
            launch(_config(workspace, variant), "--nproc-per-node", "2", f"output_dir={out}", *extra,
                   log=out.with_suffix(".log"))
            done[variant, stage] = out
        return done[variant, stage]

    return get


@pytest.fixture(scope="module")
def probe_ids(workspace) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workspace / "tokenizer")
    return torch.tensor([tok.apply_chat_template(PROBE, tokenize=True, return_dict=True)["input_ids"]])


# --------------------------------------------------------------------------- helpers


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "adapter_model.safetensors"))


def _losses(out: Path) -> list[float]:
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def _base(out: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out / "base_model", dtype=torch.float64).eval()


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def _decode_path_logits(ckpt: Path, ids, dtype: str = "float64") -> torch.Tensor:
    """Logits of the checkpoint as ``packlora decode`` loads it (adapter on its base, variant from
    adapter_config.json). The reload checks run in float64, so that 1e-5 measures whether two
    computations are the same function, not float32 rounding (logits here reach ~10)."""
    from packlora.decoding.generate import load_checkpoint

    return _logits(load_checkpoint(ckpt, dtype, "cpu").model, ids)


def _expected_shapes(variant: str) -> dict[str, tuple[int, ...]]:
    """Every tensor the variant's adapter file must hold, at full shape. A is (r, in=64), B (out, r);
    pissa/olora are saved converted (rank 2r); Qwen2 has biases on q/k/v only (k_proj out 32)."""
    grow = 2 if variant in ("pissa", "olora") else 1
    want = {}
    for i in range(LAYERS):
        p = f"base_model.model.model.layers.{i}.self_attn"
        for proj in TARGETS:
            r = grow * (2 if (proj, i) == ("q_proj", 0) and variant != "olora" else R)
            want[f"{p}.{proj}.lora_A.weight"] = (r, 64)
            want[f"{p}.{proj}.lora_B.weight"] = (OUT[proj], r)
            if LORA[variant].get("use_dora"):
                want[f"{p}.{proj}.lora_magnitude_vector"] = (OUT[proj],)
        if LORA[variant].get("bias") in ("lora_only", "all"):
            want[f"{p}.q_proj.base_layer.bias"] = (64,)
            want[f"{p}.v_proj.base_layer.bias"] = (32,)
        if LORA[variant].get("bias") == "all":
            want[f"{p}.k_proj.bias"] = (32,)  # not adapted: saved under its own name
    return want


# --------------------------------------------------------------------------- tests


def test_dora_under_zero3_trains_exactly_as_under_zero2(run):
    """DoRA reads the base weight outside the base layer's forward; under ZeRO-3 that weight is
    partitioned, so a wrong gather would change the loss or the gradient norm."""
    z3, z2 = _losses(run("dora")), _losses(run("dora", "zero2"))
    assert len(z3) == 2
    assert z3 == pytest.approx(z2, abs=1e-4), f"zero3 {z3}\nzero2 {z2}"


@pytest.mark.parametrize("variant", list(LORA))
@pytest.mark.parametrize("ckpt", ["", "checkpoint-2"])
def test_saved_adapter_holds_exactly_the_variants_tensors_at_full_shape(run, variant, ckpt):
    tensors = _tensors(run(variant) / ckpt)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == _expected_shapes(variant)
    assert all(v.dtype == torch.float32 and v.numel() > 0 for v in tensors.values())


@pytest.mark.parametrize("variant", list(LORA))
def test_adapter_config_names_the_variant(run, variant):
    cfg = json.loads((run(variant) / "adapter_config.json").read_text())
    lora = LORA[variant]
    assert (cfg["use_dora"], cfg["use_rslora"], cfg["bias"]) == (
        lora.get("use_dora", False), lora.get("use_rslora", False), lora.get("bias", "none"))
    if variant == "dora":
        assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (4, 8, "gaussian")
        assert (cfg["rank_pattern"], cfg["alpha_pattern"]) == ({Q0: 2}, {"o_proj": 3})
    elif variant == "pissa":  # converted: ranks and alphas doubled, a plain LoRA init
        assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (8, 16, True)
        assert (cfg["rank_pattern"], cfg["alpha_pattern"]) == ({Q0: 4}, {"o_proj": 6})
    else:  # olora with rsLoRA: r doubled, alpha x sqrt(2) keeps alpha / sqrt(r)
        assert (cfg["r"], cfg["init_lora_weights"]) == (8, True)
        assert cfg["lora_alpha"] == pytest.approx(8 * 2 ** 0.5)


def test_dora_rslora_patterns_and_bias_reload_to_the_hand_merged_model(run, probe_ids):
    """The decode path's logits equal a plain model whose weights are merged by hand: W' = W + s B A,
    then each row scaled to DoRA's magnitude m / ||W'||_row, and the trained biases written in."""
    out = run("dora")
    lora = {k: v.double() for k, v in _tensors(out).items()}
    merged = _base(out)
    base_logits = _logits(merged, probe_ids)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for i in range(LAYERS):
            for proj in TARGETS:
                key = f"base_model.model.model.layers.{i}.self_attn.{proj}"
                w = params[f"model.layers.{i}.self_attn.{proj}.weight"]
                w_eff = w + DORA_SCALE[proj, i] * lora[f"{key}.lora_B.weight"] @ lora[f"{key}.lora_A.weight"]
                m = lora[f"{key}.lora_magnitude_vector"]
                w.copy_(w_eff * (m / w_eff.norm(dim=1))[:, None])
                if proj != "o_proj":
                    params[f"model.layers.{i}.self_attn.{proj}.bias"].copy_(lora[f"{key}.base_layer.bias"])
    got = _decode_path_logits(out, probe_ids)
    torch.testing.assert_close(got, _logits(merged, probe_ids), atol=1e-5, rtol=1e-5)
    assert (got - base_logits).abs().max() > 1e-3, "the adapter changes nothing"


@pytest.mark.parametrize("variant", ["pissa", "olora"])
def test_converted_adapter_equals_the_residual_model_it_trained(run, probe_ids, variant):
    """PiSSA/OLoRA trained W_res + s B A. Rebuilt here without DeepSpeed (same base and settings), the
    initial A0, B0 are the saved second halves (A' = [A; A0], B' = [B, -B0]); the residual model with
    the first halves (and the trained biases, magnitudes) gives the decode path's logits."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    out = run(variant)
    saved = _tensors(out)
    lora = LORA[variant]
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM",
                     **{k: v for k, v in lora.items() if k != "loraplus_lr_ratio"})
    model = get_peft_model(_base(out).float(), cfg).eval()  # PEFT initialises PiSSA/OLoRA in float32 only
    model.double()
    init = {n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    trained = {}
    for name, t in saved.items():
        t = t.double()
        if ".lora_A." in name:
            r = t.shape[0] // 2
            torch.testing.assert_close(t[r:], init[name], atol=1e-5, rtol=1e-4)
            trained[name] = t[:r]
        elif ".lora_B." in name:
            r = t.shape[1] // 2
            torch.testing.assert_close(-t[:, r:], init[name], atol=1e-5, rtol=1e-4)
            trained[name] = t[:, :r]
        else:
            trained[name] = t  # DoRA magnitudes, biases: as trained
    result = set_peft_model_state_dict(model, trained)
    assert not result.unexpected_keys
    torch.testing.assert_close(_decode_path_logits(out, probe_ids), _logits(model, probe_ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(LORA))
def test_merged_export_gives_the_adapters_logits(run, probe_ids, variant, tmp_path):
    from transformers import AutoModelForCausalLM

    out = run(variant)
    proc = subprocess.run([sys.executable, "-m", "packlora.cli", "export", str(out), "--merge", str(tmp_path / "m")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged, probe_ids), _decode_path_logits(out, probe_ids, "float32"),
                               atol=1e-4, rtol=1e-4)


def test_loraplus_moved_b_at_four_times_the_rate_and_gaussian_drew_a_with_std_one_over_r(run):
    """B starts at zero and Adam's first step moves each element by the group's lr (sign of the
    gradient), so after 2 steps some element of every B is about 4 x 0.01 = 0.04 away from zero;
    at one rate that bound is about 2 x 0.01. gaussian draws A with std 1/r (PEFT's default, kaiming
    uniform, would have std 1/sqrt(3 x 64) = 0.072); 2 steps of 0.01 barely move it."""
    tensors = _tensors(run("dora"))
    for name, t in tensors.items():
        if ".lora_B." in name:
            assert 0.03 < t.abs().max() < 0.09, f"{name}: max |B| {t.abs().max():.4f}"
        if ".lora_A." in name:
            r = t.shape[0]
            assert abs(t.std().item() - 1 / r) < 0.2 / r, f"{name}: std {t.std():.4f}, r {r}"
