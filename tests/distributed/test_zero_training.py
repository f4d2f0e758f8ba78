"""Real 2-process DeepSpeed runs on CPU (gloo, fp32), started through ``packlora launch``.

One tiny run per ZeRO stage (built once per module, ~20 s each on 2 cores), then many tests that
each check one behaviour of its outputs: the loss goes down, both ranks train on different rows
with world size 2, every saved adapter holds every LoRA tensor at full shape (ZeRO-3 runs with
``stage3_param_persistence_threshold: 0`` so that the tiny LoRA tensors really are partitioned),
the adapter reloads with plain PEFT to the same logits as a hand-merged model, the base model file
is the seeded build and is never rewritten, and the checkpoint file set, data report, decoded
replies and TensorBoard events are all there.

    python -m pytest -m distributed tests/distributed -q -x
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from launching import launch_env
from tiny_assets import SHISHUO_CHATS, build_chatml_tokenizer, tiny_qwen2_config

pytestmark = pytest.mark.distributed

REPO_ROOT = Path(__file__).resolve().parents[2]
STAGES = ("zero2", "zero3")
RUN_TIMEOUT_S = 300

# The run, written once here; every expected value below is derived by hand from these numbers.
VOCAB = 400  # the tiny ChatML tokenizer: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2
HIDDEN, LAYERS, HEADS, KV_HEADS = 64, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS  # 16
RANK, ALPHA = 8, 16
LORA_SCALE = 2.0  # ALPHA / RANK, written out: the test must not share arithmetic with peft
MAX_STEPS, SAVE_STEPS = 12, 6
RECORDS, HOLDOUT = 64, 2
SEED = 0
# initializer_range 0.2 (default 0.02): with q/v-only LoRA on a random base, the default init
# leaves o_proj so small that 12 steps move the loss by ~2%; at 0.2 it falls by ~14%.
MODEL_CONFIG = tiny_qwen2_config(VOCAB, initializer_range=0.2)
# Full shapes of every LoRA tensor in adapter_model.safetensors: A is (r, in), B is (out, r);
# q_proj out = HEADS * HEAD_DIM = 64, v_proj out = KV_HEADS * HEAD_DIM = 32.
EXPECTED_LORA_SHAPES = {
    f"base_model.model.model.layers.{i}.self_attn.{proj}.lora_{ab}.weight": shape
    for i in range(LAYERS)
    for proj, ab, shape in (
        ("q_proj", "A", (8, 64)),
        ("q_proj", "B", (64, 8)),
        ("v_proj", "A", (8, 64)),
        ("v_proj", "B", (32, 8)),
    )
}
CHECKPOINT_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "generation_config.json",
    "packlora_config.yaml",
    "tokenizer.json",
    "chat_template.jinja",
    "trainer_state.json",
}
STOP_IDS = [2, 0]  # <|im_end|>, <|endoftext|>
# A fixed input for logit comparisons: a short ChatML prompt, token ids of the tiny tokenizer.
PROBE_MESSAGES = [
    {"role": "user", "content": "Rewrite this sentence in the style of an old novel, please."},
    {"role": "assistant", "content": "Once upon a time there lived a scholar who loved wine."},
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Tokenizer, 64 real chats, a ZeRO-3 JSON with persistence threshold 0, and the run YAML."""
    ws = tmp_path_factory.mktemp("zero_training")
    build_chatml_tokenizer(ws / "tokenizer", vocab_size=VOCAB)

    lines = SHISHUO_CHATS.read_text(encoding="utf-8").splitlines()[:RECORDS]
    assert len(lines) == RECORDS, f"{SHISHUO_CHATS} has fewer than {RECORDS} lines"
    (ws / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    ds = json.loads((REPO_ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny LoRA tensors
    (ws / "zero3_partition_all.json").write_text(json.dumps(ds, indent=1))

    config = {
        "output_dir": str(ws / "unused"),  # each stage overrides it
        "seed": SEED,
        "deepspeed": "zero2.json",
        "log_batch_digests": True,
        "model": {"config": MODEL_CONFIG, "tokenizer": str(ws / "tokenizer"), "attn_implementation": "sdpa"},
        "lora": {"r": RANK, "alpha": ALPHA, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {
            "train": [str(ws / "chats.jsonl")],
            "max_seq_length": 512,  # Chinese characters are ~3 byte tokens each here
            "overflow": "drop",
            "eval_holdout": HOLDOUT,
            "cache_dir": str(ws / "cache"),
        },
        "training": {
            "max_steps": MAX_STEPS,
            "learning_rate": 2.0e-2,
            "lr_scheduler_type": "constant",
            "per_device_train_batch_size": 1,
            "logging_steps": 1,
            "save_steps": SAVE_STEPS,
        },
        "decoding": {"max_new_tokens": 16},
    }
    (ws / "run.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return ws


def _launch(workspace: Path, stage: str) -> Path:
    out = workspace / stage
    ds = str(workspace / "zero3_partition_all.json") if stage == "zero3" else "zero2.json"
    cmd = [
        sys.executable, "-m", "packlora.cli", "launch", str(workspace / "run.yaml"),
        "--nproc-per-node", "2", f"output_dir={out}", f"deepspeed={ds}",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S
    )
    log = proc.stdout + proc.stderr
    (workspace / f"{stage}.log").write_text(log, encoding="utf-8")
    if proc.returncode != 0:
        pytest.fail(f"{stage}: `{' '.join(cmd)}` exited {proc.returncode}; last output:\n{log[-6000:]}")
    return out


@pytest.fixture(scope="module")
def trained(workspace):
    """``trained(stage)`` -> output_dir of that stage's run, launched on first use only."""
    runs: dict[str, Path] = {}

    def get(stage: str) -> Path:
        if stage not in runs:
            runs[stage] = _launch(workspace, stage)
        return runs[stage]

    return get


@pytest.fixture(scope="module")
def tokenizer(workspace):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(workspace / "tokenizer")


@pytest.fixture(scope="module")
def probe_ids(tokenizer) -> torch.Tensor:
    ids = tokenizer.apply_chat_template(PROBE_MESSAGES, tokenize=True, return_dict=True)["input_ids"]
    return torch.tensor([ids])


# --------------------------------------------------------------------------- helpers


def _losses(out: Path) -> list[float]:
    state = json.loads((out / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    return [e["loss"] for e in state["log_history"] if "loss" in e]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _adapter_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(ckpt / "adapter_model.safetensors"))


def _load_base(out: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out / "base_model", dtype=torch.float32).eval()


def _load_peft(out: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(_load_base(out), out, is_trainable=False).eval()


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("stage", STAGES)
def test_loss_decreases_over_training(trained, stage):
    losses = _losses(trained(stage))
    assert len(losses) == MAX_STEPS, losses
    assert all(math.isfinite(x) for x in losses), losses
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    # observed: ~7.29 -> ~6.26 (-14%); ln(400) = 5.99 is not the start because the init is wide
    assert last < 0.95 * first, f"mean loss of the first 3 steps {first:.4f}, of the last 3 {last:.4f}: {losses}"


def test_zero2_and_zero3_follow_the_same_loss_curve(trained):
    """Same data, seed and fp32 maths: the ZeRO stage changes where tensors live, not the result."""
    z2, z3 = _losses(trained("zero2")), _losses(trained("zero3"))
    assert z2 == pytest.approx(z3, abs=1e-3), f"zero2 {z2}\nzero3 {z3}"


@pytest.mark.parametrize("stage", STAGES)
def test_each_rank_trains_on_different_rows_with_world_size_2(trained, stage):
    out = trained(stage)
    logs = {r: _read_jsonl(out / f"batches.rank{r}.jsonl") for r in (0, 1)}
    for r, lines in logs.items():
        assert [x["step"] for x in lines] == list(range(MAX_STEPS)), f"rank {r}: {lines}"
        assert all(x["world_size"] == 2 and x["rank"] == r for x in lines), f"rank {r}: {lines}"
    d0, d1 = [x["digest"] for x in logs[0]], [x["digest"] for x in logs[1]]
    # 24 rows drawn from 43 packed rows (less than one epoch): no row is seen twice.
    assert len(set(d0)) == len(set(d1)) == MAX_STEPS, (d0, d1)
    assert not set(d0) & set(d1), f"both ranks trained on the same rows: {sorted(set(d0) & set(d1))}"


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("ckpt", ["", f"checkpoint-{SAVE_STEPS}", f"checkpoint-{MAX_STEPS}"])
def test_adapter_has_every_lora_tensor_at_full_shape(trained, stage, ckpt):
    tensors = _adapter_tensors(trained(stage) / ckpt)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    assert shapes == EXPECTED_LORA_SHAPES
    assert all(v.dtype == torch.float32 and v.numel() > 0 for v in tensors.values())


@pytest.mark.parametrize("stage", STAGES)
def test_saved_lora_b_is_trained(trained, stage):
    """lora_B starts at zero, so a nonzero B in the file proves trained values were gathered and saved;
    checkpoint-6 and the final adapter differ because training went on."""
    out = trained(stage)
    final, mid = _adapter_tensors(out), _adapter_tensors(out / f"checkpoint-{SAVE_STEPS}")
    for name, t in final.items():
        if ".lora_B." in name:
            assert t.abs().max() > 0, f"{name} is all zeros in {out}"
            assert mid[name].abs().max() > 0, f"{name} is all zeros in checkpoint-{SAVE_STEPS}"
    assert any(not torch.equal(final[k], mid[k]) for k in final), "adapter did not change after step 6"


@pytest.mark.parametrize("stage", STAGES)
def test_final_adapter_equals_last_checkpoint(trained, stage):
    out = trained(stage)
    final, last = _adapter_tensors(out), _adapter_tensors(out / f"checkpoint-{MAX_STEPS}")
    assert final.keys() == last.keys()
    assert all(torch.equal(final[k], last[k]) for k in final)


@pytest.mark.parametrize("stage", STAGES)
def test_reloaded_adapter_matches_hand_merged_weights(trained, stage, probe_ids):
    """PEFT's reload and an independent path (W + 2.0 * B @ A written into a plain base) agree,
    and both differ from the base model: the adapter does something."""
    out = trained(stage)
    peft_logits = _logits(_load_peft(out), probe_ids)

    merged = _load_base(out)
    base_logits = _logits(merged, probe_ids)
    lora = _adapter_tensors(out)
    params = dict(merged.named_parameters())
    with torch.no_grad():
        for i in range(LAYERS):
            for proj in ("q_proj", "v_proj"):
                prefix = f"base_model.model.model.layers.{i}.self_attn.{proj}"
                a, b = lora[f"{prefix}.lora_A.weight"], lora[f"{prefix}.lora_B.weight"]
                params[f"model.layers.{i}.self_attn.{proj}.weight"].add_(LORA_SCALE * (b @ a))
    merged_logits = _logits(merged, probe_ids)

    assert peft_logits.shape == (1, probe_ids.shape[1], VOCAB)
    torch.testing.assert_close(peft_logits, merged_logits, atol=1e-5, rtol=1e-5)
    diff = (peft_logits - base_logits).abs().max().item()
    assert diff > 1e-4, f"adapter logits differ from the base's by only {diff}"


@pytest.mark.parametrize("stage", STAGES)
def test_adapter_config_names_the_saved_base_and_lora_settings(trained, stage):
    out = trained(stage)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]) == (out / "base_model").resolve()
    assert (cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == (RANK, ALPHA, False)
    assert set(cfg["target_modules"]) == {"q_proj", "v_proj"}


@pytest.mark.parametrize("stage", STAGES)
def test_base_model_is_the_seeded_build_and_untouched_by_training(trained, stage):
    """The saved base equals a fresh seeded build of model.config, equals the base inside the
    reloaded PeftModel, was written before the first checkpoint, and no full weights were saved."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    out = trained(stage)
    saved = load_file(str(out / "base_model" / "model.safetensors"))

    spec = {k: v for k, v in MODEL_CONFIG.items() if k != "model_type"}
    set_seed(SEED)
    fresh = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **spec), dtype=torch.float32)
    fresh_sd = fresh.state_dict()
    # inside a PeftModel, an adapted Linear keeps its frozen weight as `<proj>.base_layer.weight`
    inner_sd = {
        k.replace(".base_layer.", "."): v
        for k, v in _load_peft(out).get_base_model().state_dict().items()
        if "lora_" not in k
    }
    for name, t in saved.items():
        assert torch.equal(t, fresh_sd[name]), f"base_model {name} is not the seeded build"
        assert torch.equal(t, inner_sd[name]), f"reloaded base {name} differs from base_model/model.safetensors"
    assert not any("lora_" in k for k in saved)
    assert set(saved) <= set(inner_sd) and set(saved) <= set(fresh_sd)

    ckpt = out / f"checkpoint-{SAVE_STEPS}" / "adapter_model.safetensors"
    assert (out / "base_model" / "model.safetensors").stat().st_mtime <= ckpt.stat().st_mtime
    assert not (out / "model.safetensors").exists(), "full model weights were saved next to the adapter"


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_holds_the_packlora_file_set(trained, stage, workspace):
    out = trained(stage)
    # the final save in output_dir is the same set, less the Trainer's trainer_state.json
    for ckpt, expected in ((out / f"checkpoint-{SAVE_STEPS}", CHECKPOINT_FILES),
                           (out, CHECKPOINT_FILES - {"trainer_state.json"})):  # fmt: skip
        missing = expected - {p.name for p in ckpt.iterdir()}
        assert not missing, f"{ckpt} lacks {sorted(missing)}"
        gen = json.loads((ckpt / "generation_config.json").read_text())
        assert gen["eos_token_id"] == STOP_IDS
        assert gen["max_new_tokens"] == 16
    resolved = yaml.safe_load((out / f"checkpoint-{SAVE_STEPS}" / "packlora_config.yaml").read_text(encoding="utf-8"))
    assert resolved["seed"] == SEED and resolved["output_dir"] == str(out)
    expected_ds = str(workspace / "zero3_partition_all.json") if stage == "zero3" else "zero2.json"
    assert resolved["deepspeed"] == expected_ds


@pytest.mark.parametrize("stage", STAGES)
def test_data_report_trains_every_end_of_turn_and_no_role_marker(trained, stage):
    report = json.loads((trained(stage) / "data_report.json").read_text())
    assert report["role_markers_in_labels"] == 0
    assert report["assistant_turns"] > report["examples"] > 0  # some chats have 2 assistant turns
    assert report["turns_with_end_of_turn_trained"] == report["assistant_turns"]
    assert (report["records"], report["heldout"]) == (RECORDS, HOLDOUT)
    dropped = report["dropped"].get("too_long", 0)
    assert report["examples"] + dropped == RECORDS - HOLDOUT
    # enough rows that 2 ranks x 12 steps never repeat one (the disjoint-digest test relies on it)
    assert report["rows"] >= 2 * MAX_STEPS


@pytest.mark.parametrize("stage", STAGES)
def test_heldout_prompts_are_decoded(trained, stage):
    rows = _read_jsonl(trained(stage) / "decoded.jsonl")
    assert len(rows) == HOLDOUT
    for row in rows:
        assert row["stop_reason"] in {"stop_id", "max_new_tokens"}, row
        assert 0 < row["num_new_tokens"] <= 16, row
        assert row["messages"][-1]["role"] == "user" and row["reference"], row


@pytest.mark.parametrize("stage", STAGES)
def test_tensorboard_events_log_every_training_loss(trained, stage):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = trained(stage) / "runs"
    events = list(runs.rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard events under {runs}"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    logged = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in logged] == list(range(1, MAX_STEPS + 1))
    assert [v for _, v in logged] == pytest.approx(_losses(trained(stage)), abs=1e-5)


@pytest.mark.parametrize("stage", STAGES)
def test_tensorboard_shows_packing_and_supervised_token_figures_next_to_the_loss(trained, stage):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = trained(stage)
    acc = EventAccumulator(str(next((out / "runs").rglob("events.out.tfevents.*")).parent))
    acc.Reload()
    report = json.loads((out / "data_report.json").read_text())
    for tag in ("train/supervised_tokens_per_s", "train/supervised_token_fraction",
                "train/packing_efficiency", "train/rows_per_epoch"):
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, MAX_STEPS + 1)), tag
    assert {e.value for e in acc.Scalars("train/rows_per_epoch")} == {report["rows"]}
    assert acc.Scalars("train/packing_efficiency")[0].value == pytest.approx(report["packing_efficiency"], rel=1e-6)
    assert all(e.value > 0 for e in acc.Scalars("train/supervised_tokens_per_s"))
    # 1 row x 2 ranks per step; the supervised share of the label slots is a real fraction
    assert all(0.0 < e.value < 1.0 for e in acc.Scalars("train/supervised_token_fraction"))


def test_launch_dry_run_prints_a_two_process_deepspeed_command(workspace):
    out = workspace / "dry-run"
    proc = subprocess.run(
        [sys.executable, "-m", "packlora.cli", "launch", str(workspace / "run.yaml"),
         "--nproc-per-node", "2", "--dry-run", f"output_dir={out}", "training.max_steps=3"],
        cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    words = line.split()
    assert "deepspeed" in words
    assert "--num_accelerators 2" in line
    assert "--no_local_rank --module packlora.train" in line
    assert line.endswith(f"{workspace / 'run.yaml'} output_dir={out} training.max_steps=3")
    assert not out.exists(), "--dry-run started training"


@pytest.mark.parametrize("stage", STAGES)
def test_the_run_log_holds_no_library_noise(trained, stage, workspace):
    """Deprecations inside the libraries, DeepSpeed's compiler probe and accelerate's accumulation
    "mismatch" say nothing about the run; packlora filters them (``packlora.training.process.quiet_known_noise``)."""
    trained(stage)
    log = (workspace / f"{stage}.log").read_text(encoding="utf-8")
    for noise in ("FutureWarning", "compilers.C.base", "Gradient accumulation steps mismatch", "pin_memory"):
        assert noise not in log, noise
    assert "batch arithmetic:" in log  # what is worth saying is still said
