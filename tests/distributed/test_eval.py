"""Evaluation loss in a real 2-process ZeRO-3 run (LoRA tensors partitioned): ``data.eval_split``,
``eval/loss`` in TensorBoard at every save step, and ``early_stopping_patience`` ending on the best
checkpoint (``load_best_model_at_end`` under ZeRO-3).

    python -m pytest -m distributed tests/distributed/test_eval.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launching import REPO_ROOT, launch
from tiny_assets import SHISHUO_CHATS, build_chatml_tokenizer, tiny_qwen2_config

pytestmark = pytest.mark.distributed

RECORDS, EVAL_SPLIT, MAX_STEPS, SAVE_STEPS = 48, 0.25, 6, 2


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("eval")
    build_chatml_tokenizer(ws / "tokenizer")
    lines = SHISHUO_CHATS.read_text(encoding="utf-8").splitlines()[:RECORDS]
    (ws / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = json.loads((REPO_ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny LoRA tensors
    (ws / "zero3.json").write_text(json.dumps(ds))
    config = {
        "output_dir": str(ws / "out"), "seed": 0, "deepspeed": str(ws / "zero3.json"),
        "early_stopping_patience": 100,  # never stops here; it turns on load_best_model_at_end
        "model": {"config": tiny_qwen2_config(400, initializer_range=0.2), "tokenizer": str(ws / "tokenizer"),
                  "attn_implementation": "sdpa"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": [str(ws / "chats.jsonl")], "max_seq_length": 512, "overflow": "drop",
                 "eval_split": EVAL_SPLIT, "cache_dir": str(ws / "cache")},
        "training": {"max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "learning_rate": 5e-2,
                     "lr_scheduler_type": "constant", "per_device_train_batch_size": 1, "logging_steps": 1},
        "decoding": {"max_new_tokens": 8},
    }
    (ws / "run.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    launch(ws / "run.yaml", "--nproc-per-node", "2", log=ws / "run.log", timeout=600)
    return ws / "out"


def _scalars(run: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for events in run.glob("runs/**/events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            out.update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def test_eval_loss_is_logged_to_tensorboard_at_every_save_step(run):
    report = json.loads((run / "data_report.json").read_text())
    assert report["evaluation"]["records"] == round(EVAL_SPLIT * report["records"])
    losses = _scalars(run, "eval/loss")
    assert sorted(losses) == list(range(SAVE_STEPS, MAX_STEPS + 1, SAVE_STEPS))
    assert all(0 < v < 20 for v in losses.values())
    state = json.loads((run / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    logged = {h["step"]: h["eval_loss"] for h in state["log_history"] if "eval_loss" in h}
    assert logged == pytest.approx(losses, rel=1e-5)


def test_load_best_model_at_end_ends_on_the_best_checkpoint_under_zero3(run):
    from safetensors.torch import load_file

    state = json.loads((run / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    evals = {h["step"]: h["eval_loss"] for h in state["log_history"] if "eval_loss" in h}
    best_step = min(evals, key=evals.get)
    assert Path(state["best_model_checkpoint"]) == run / f"checkpoint-{best_step}"  # the committed name
    final = load_file(str(run / "adapter_model.safetensors"))
    best = load_file(str(run / f"checkpoint-{best_step}" / "adapter_model.safetensors"))
    assert final.keys() == best.keys() and all(final[k].equal(best[k]) for k in final)
    assert all(t.numel() > 0 for t in final.values())  # gathered at full shape, not empty partitions
