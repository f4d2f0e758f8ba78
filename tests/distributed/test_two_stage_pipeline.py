"""The two-stage style workflow end to end, 2 processes on CPU (gloo, fp32), tiny model:

    stage 1 (raw 世说新语 text, ZeRO-2)  ->  packlora subset (50% of 40 chats)
      -> stage-2 correction from stage 1, init_mode: merge, preset shishuo (ZeRO-3, lr 8e-5, 1 epoch)
      -> packlora decode --preset shishuo
    and stage 2 from stage 1 with init_mode: continue at learning rate 0 (ZeRO-3), whose adapter
    must come out exactly as stage 1 left it.

Three ~25 s launches; about 1.5 minutes on 2 cores.

    python -m pytest -m distributed tests/distributed/test_two_stage_pipeline.py -q
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from launching import launch_env
from tiny_assets import SHARED, SHISHUO_CHATS, build_chatml_tokenizer, tiny_qwen2_config

pytestmark = pytest.mark.distributed

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 300
VOCAB = 400
RANK, ALPHA = 8, 16
LORA_SCALE = 2.0  # ALPHA / RANK, written out
CHATS, RATIO = 40, 0.5
STAGE1_DOCS = 2
PRESET_SYSTEM = "你是一个文学创作助手，擅长《世说新语》的文言笔法。你的回复必须在完成改写后立即结束，不得继续生成任何对话、提示或新任务。"
# q_proj out = 4 heads x 16 = 64, v_proj out = 2 kv heads x 16 = 32, hidden 64; A is (r, in), B (out, r)
EXPECTED_LORA_SHAPES = {
    f"base_model.model.model.layers.{i}.self_attn.{proj}.lora_{ab}.weight": shape
    for i in range(2)
    for proj, ab, shape in (("q_proj", "A", (8, 64)), ("q_proj", "B", (64, 8)),
                            ("v_proj", "A", (8, 64)), ("v_proj", "B", (32, 8)))
}


def _run(ws: Path, name: str, *args: str) -> str:
    cmd = [sys.executable, "-m", "packlora.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    log = proc.stdout + proc.stderr
    (ws / f"{name}.log").write_text(log, encoding="utf-8")
    if proc.returncode != 0:
        pytest.fail(f"{name}: `{' '.join(cmd)}` exited {proc.returncode}; last output:\n{log[-6000:]}")
    return log


def _write_yaml(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    ws = tmp_path_factory.mktemp("two_stage")
    build_chatml_tokenizer(ws / "tokenizer", vocab_size=VOCAB)
    docs = (SHARED / "data" / "shishuo" / "stage1_text.jsonl").read_text(encoding="utf-8").splitlines()[:STAGE1_DOCS]
    (ws / "text.jsonl").write_text("\n".join(docs) + "\n", encoding="utf-8")
    # chats without their system message, so that the preset supplies it
    chats = []
    for line in SHISHUO_CHATS.read_text(encoding="utf-8").splitlines()[:CHATS]:
        msgs = [m for m in json.loads(line)["messages"] if m["role"] != "system"]
        chats.append(json.dumps({"messages": msgs}, ensure_ascii=False))
    (ws / "chats.jsonl").write_text("\n".join(chats) + "\n", encoding="utf-8")
    (ws / "prompts.jsonl").write_text("\n".join(
        json.dumps({"messages": json.loads(c)["messages"][:1]}, ensure_ascii=False) for c in chats[:2]) + "\n")
    ds = json.loads((REPO_ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the LoRA tensors
    (ws / "zero3_all.json").write_text(json.dumps(ds))

    common = {
        "seed": 0,
        "model": {"config": tiny_qwen2_config(VOCAB, initializer_range=0.2), "tokenizer": str(ws / "tokenizer")},
        "lora": {"r": RANK, "alpha": ALPHA, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "decoding": {"max_new_tokens": 8},
    }
    stage1 = _write_yaml(ws / "stage1.yaml", {
        **common, "output_dir": str(ws / "stage1"), "deepspeed": "zero2.json",
        "data": {"train": [str(ws / "text.jsonl")], "stage": "pretrain", "max_seq_length": 512,
                 "cache_dir": str(ws / "cache")},
        "training": {"max_steps": 4, "learning_rate": 2.0e-2, "lr_scheduler_type": "constant",
                     "per_device_train_batch_size": 1, "save_steps": 100},
    })
    _run(ws, "stage1", "launch", str(stage1), "--nproc-per-node", "2")
    _run(ws, "subset", "subset", "--input", str(ws / "chats.jsonl"), "--output", str(ws / "correction.jsonl"),
         "--ratio", str(RATIO), "--seed", "1", "--tokenizer", str(ws / "tokenizer"))
    stage2 = {
        **common, "deepspeed": str(ws / "zero3_all.json"), "init_from": str(ws / "stage1"), "preset": "shishuo",
        "data": {"train": [str(ws / "correction.jsonl")], "stage": "sft", "max_seq_length": 1024, "overflow": "drop",
                 "cache_dir": str(ws / "cache")},
        "training": {"num_train_epochs": 1, "learning_rate": 8.0e-5, "per_device_train_batch_size": 1,
                     "save_steps": 100},
    }
    correction = _write_yaml(ws / "correction.yaml", {**stage2, "output_dir": str(ws / "correction"), "init_mode": "merge"})
    _run(ws, "correction", "launch", str(correction), "--nproc-per-node", "2")
    cont = _write_yaml(ws / "continue.yaml", {
        **stage2, "output_dir": str(ws / "continue"), "init_mode": "continue",
        "training": {"max_steps": 2, "learning_rate": 0.0, "per_device_train_batch_size": 1, "save_steps": 100},
    })
    _run(ws, "continue", "launch", str(cont), "--nproc-per-node", "2")
    _run(ws, "decode", "decode", str(ws / "correction"), "--input", str(ws / "prompts.jsonl"),
         "--output", str(ws / "decoded.jsonl"), "--preset", "shishuo")
    return ws


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _shapes(ckpt: Path) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _tensors(ckpt / "adapter_model.safetensors").items()}


def test_stage1_splits_documents_into_counted_chunks(pipeline):
    report = json.loads((pipeline / "stage1" / "data_report.json").read_text())
    assert report["records"] == STAGE1_DOCS and report["split_chunks"] > 0
    assert report["examples"] == STAGE1_DOCS + report["split_chunks"]
    assert _shapes(pipeline / "stage1") == EXPECTED_LORA_SHAPES


def test_subset_manifest_counts(pipeline):
    m = json.loads((pipeline / "correction.manifest.json").read_text())
    assert (m["counts"]["source"], m["counts"]["subset"]) == (40, 20)
    # the first 40 chats hold 8 two-turn ones; half of each kind is drawn
    assert m["counts"]["source_by_assistant_turns"] == {"1": 32, "2": 8}
    assert m["counts"]["subset_by_assistant_turns"] == {"1": 16, "2": 4}
    assert len((pipeline / "correction.jsonl").read_text().splitlines()) == 20


def test_merge_mode_starts_from_stage1_base_plus_adapter(pipeline):
    cfg = yaml.safe_load((pipeline / "correction" / "packlora_config.yaml").read_text())
    assert (cfg["init_from"], cfg["init_mode"], cfg["preset"]) == (str(pipeline / "stage1"), "merge", "shishuo")
    marker = json.loads((pipeline / "correction" / "base_model" / "packlora_base.json").read_text())
    assert (marker["init_from"], marker["init_mode"]) == (str(pipeline / "stage1"), "merge")
    base1 = _tensors(pipeline / "stage1" / "base_model" / "model.safetensors")
    lora1 = _tensors(pipeline / "stage1" / "adapter_model.safetensors")
    base2 = _tensors(pipeline / "correction" / "base_model" / "model.safetensors")
    for layer in range(2):
        for proj in ("q_proj", "v_proj"):
            key = f"model.layers.{layer}.self_attn.{proj}"
            a, b = lora1[f"base_model.model.{key}.lora_A.weight"], lora1[f"base_model.model.{key}.lora_B.weight"]
            assert b.abs().max() > 0  # stage 1 really trained its adapter
            assert torch.allclose(base2[f"{key}.weight"], base1[f"{key}.weight"] + LORA_SCALE * b @ a, atol=1e-6)
    assert torch.equal(base2["model.embed_tokens.weight"], base1["model.embed_tokens.weight"])
    adapter_cfg = json.loads((pipeline / "correction" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(pipeline / "correction" / "base_model")
    assert _shapes(pipeline / "correction") == EXPECTED_LORA_SHAPES


def test_correction_run_trained_the_preset_into_its_chats_for_one_epoch(pipeline):
    log = (pipeline / "correction.log").read_text(encoding="utf-8")
    assert "preset shishuo" in log
    state = json.loads(next((pipeline / "correction").glob("checkpoint-*/trainer_state.json")).read_text())
    assert state["num_train_epochs"] == 1 and state["global_step"] >= 1
    report = json.loads((pipeline / "correction" / "data_report.json").read_text())
    assert (report["records"], report["examples"], report["dropped"]) == (20, 20, {})


def test_continue_mode_starts_from_the_stage1_adapter(pipeline):
    # learning rate 0: the adapter that comes out is the adapter training started from
    start, stage1 = _tensors(pipeline / "continue" / "adapter_model.safetensors"), _tensors(
        pipeline / "stage1" / "adapter_model.safetensors")
    assert start.keys() == stage1.keys() == EXPECTED_LORA_SHAPES.keys()
    for k in stage1:
        assert torch.equal(start[k], stage1[k]), k
    adapter_cfg = json.loads((pipeline / "continue" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(pipeline / "stage1" / "base_model")
    assert not (pipeline / "continue" / "base_model").exists()


def test_stage2_checkpoint_decodes_with_the_preset(pipeline):
    rows = [json.loads(line) for line in (pipeline / "decoded.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["messages"][0] == {"role": "system", "content": PRESET_SYSTEM}
        assert row["stop_reason"] in ("stop_id", "max_new_tokens") and 1 <= row["num_new_tokens"] <= 8
