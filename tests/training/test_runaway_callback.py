"""The training-time runaway callback: in-process on a scripted model, and in a real 2-process
ZeRO-3 run (parameters partitioned, so every rank takes part in ``generate``)."""
from __future__ import annotations

import json
import os
from functools import partial
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from tiny_assets import ENDOFTEXT, IM_END, REPO_ROOT, scripted_lm, tiny_qwen2_config

from packlora.data_utils.chat_format import ChatFormat
from packlora.decoding.runaway import evaluate_runaway
from packlora.training.runaway_callback import RunawayEvalCallback, heldout_prompts

A = [{"role": "user", "content": "Hello!"}]


class _Trainer:
    def __init__(self):
        self.logged = []

    def log(self, logs):  # like Trainer.log: CallbackHandler.on_log resets should_log
        self.logged.append(logs)
        self.control.should_log = False


def test_callback_runs_every_n_steps_logs_scalars_and_appends_the_report(chatml_tokenizer, tmp_path):
    prompt = tuple(chatml_tokenizer.encode(chatml_tokenizer.apply_chat_template(A, add_generation_prompt=True, tokenize=False),
                                     add_special_tokens=False))
    model = scripted_lm(len(chatml_tokenizer), {prompt: [*chatml_tokenizer.encode("Hi"), IM_END]}, filler=ENDOFTEXT)
    trainer = _Trainer()
    evaluate = partial(evaluate_runaway, fmt=ChatFormat(chatml_tokenizer), prompts=[(A, "Hi", "h:1")],
                       stop_ids=[IM_END, ENDOFTEXT], max_new_tokens=8, batch_size=1)
    cb = RunawayEvalCallback(evaluate, every_steps=2, output_dir=tmp_path).attach(trainer)
    for step in (1, 2, 3, 4):
        control = SimpleNamespace(should_log=True)
        trainer.control = control
        cb.on_step_end(None, SimpleNamespace(global_step=step, is_world_process_zero=True), control, model=model)
        assert control.should_log  # the loss of this step is still logged
    assert [log["runaway/runaway"] for log in trainer.logged] == [0.0, 0.0]
    assert trainer.logged[0]["runaway/emitted_end_of_turn"] == 1.0
    lines = [json.loads(x) for x in (tmp_path / "runaway_eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [2, 4] and lines[0]["worst"][0]["reply"] == "Hi"


def test_heldout_prompts_split_off_the_reference():
    from packlora.data_utils.types import ChatRecord, Message, Source

    rec = ChatRecord((Message("user", "q"), Message("assistant", "a")), Source("f", 3))
    assert heldout_prompts([rec, rec], 1) == [([{"role": "user", "content": "q"}], "a", "f:3")]


@pytest.mark.distributed
def test_two_process_zero3_run_logs_runaway_metrics_next_to_the_loss(tmp_path):
    from tiny_assets import SHISHUO_CHATS, build_chatml_tokenizer

    build_chatml_tokenizer(tmp_path / "tok")
    (tmp_path / "chats.jsonl").write_text("\n".join(SHISHUO_CHATS.read_text().splitlines()[:24]) + "\n")
    ds = json.loads((REPO_ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # really partition every tensor
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    out = tmp_path / "run"
    config = {
        "output_dir": str(out), "seed": 0, "deepspeed": str(tmp_path / "zero3.json"),
        "model": {"config": tiny_qwen2_config(400), "tokenizer": str(tmp_path / "tok")},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": [str(tmp_path / "chats.jsonl")], "max_seq_length": 512, "eval_holdout": 2,
                 "cache_dir": str(tmp_path / "cache")},
        "training": {"max_steps": 2, "per_device_train_batch_size": 1, "logging_steps": 1, "save_steps": 100},
        "decoding": {"max_new_tokens": 4},
        "runaway_eval": {"every_steps": 1, "num_prompts": 2, "max_new_tokens": 6},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TENSORBOARD_LOGGING_DIR")}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-m", "packlora.cli", "launch", str(tmp_path / "run.yaml"),
                           "--nproc-per-node", "2"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    lines = [json.loads(x) for x in (out / "runaway_eval.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2]  # rank 0 writes once per evaluation, not once per rank
    assert all(x["num_prompts"] == 2 and x["max_new_tokens"] == 6 for x in lines)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    [events] = list((out / "runs").iterdir())
    acc = EventAccumulator(str(events))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags and "train/runaway/runaway" in tags, tags
    assert [e.step for e in acc.Scalars("train/runaway/runaway")] == [1, 2]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]
