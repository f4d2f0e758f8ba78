"""Exact resume: a 2-process CPU run (ZeRO-2, ZeRO-3) is SIGKILLed after a checkpoint, and
``packlora launch ... training.resume_from_checkpoint=auto`` continues it from the newest complete
checkpoint. The losses of the steps after it equal those of an uninterrupted run with the same
seed (fp32 on CPU, within 1e-6), and the data order continues where it stopped: each rank trains
on the same batch digests, step for step, as in the uninterrupted run.

Per stage: one uninterrupted run, one run killed (the whole launcher process group, SIGKILL) as
soon as ``checkpoint-3`` appears, one resumed run; ~25 s each on 2 cores.

    python -m pytest -m distributed tests/distributed/test_resume.py -q -x
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from launching import REPO_ROOT, launch, launch_env
from tiny_assets import SHISHUO_CHATS, build_chatml_tokenizer, tiny_qwen2_config

pytestmark = pytest.mark.distributed

STAGES = ("zero2", "zero3")
MAX_STEPS, SAVE_STEPS = 9, 3  # checkpoints at 3, 6, 9; the kill lands after checkpoint-3
RECORDS, SEED = 48, 0
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("resume")
    build_chatml_tokenizer(ws / "tokenizer", vocab_size=400)
    lines = SHISHUO_CHATS.read_text(encoding="utf-8").splitlines()[:RECORDS]
    (ws / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = json.loads((REPO_ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # really partition the LoRA tensors
    (ws / "zero3_partition_all.json").write_text(json.dumps(ds, indent=1))
    config = {
        "output_dir": str(ws / "unused"),
        "seed": SEED,
        "log_batch_digests": True,
        "model": {"config": tiny_qwen2_config(400, initializer_range=0.2), "tokenizer": str(ws / "tokenizer")},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},  # dropout: RNG state resumes too
        "data": {"train": [str(ws / "chats.jsonl")], "max_seq_length": 512, "overflow": "drop",
                 "cache_dir": str(ws / "cache")},
        "training": {"max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "learning_rate": 2.0e-2,
                     "lr_scheduler_type": "linear", "warmup_steps": 2, "per_device_train_batch_size": 1,
                     "logging_steps": 1},
    }  # fmt: skip
    (ws / "run.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return ws


def _overrides(workspace: Path, stage: str, out: Path) -> list[str]:
    ds = str(workspace / "zero3_partition_all.json") if stage == "zero3" else "zero2.json"
    return ["--nproc-per-node", "2", f"output_dir={out}", f"deepspeed={ds}"]


def _launch_and_kill(workspace: Path, stage: str, out: Path, after: str) -> None:
    """Start the run in its own process group; SIGKILL the whole group once ``out/after`` exists."""
    cmd = [sys.executable, "-m", "packlora.cli", "launch", str(workspace / "run.yaml"), *_overrides(workspace, stage, out)]
    log = open(workspace / f"{stage}-killed.log", "w", encoding="utf-8")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=launch_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not (out / after).is_dir():
            if proc.poll() is not None:
                pytest.fail(f"{stage}: the run ended (exit {proc.returncode}) before {after} appeared; "
                            f"see {workspace / f'{stage}-killed.log'}")  # fmt: skip
            if time.monotonic() > deadline:
                pytest.fail(f"{stage}: no {after} after {RUN_TIMEOUT_S} s")
            time.sleep(0.05)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank it started
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)
        log.close()


@pytest.fixture(scope="module")
def runs(workspace):
    """``runs(stage)`` -> (uninterrupted output_dir, resumed output_dir, digest lines before the resume)."""
    done: dict[str, tuple[Path, Path, dict[int, int]]] = {}

    def get(stage: str):
        if stage not in done:
            ref, res = workspace / f"{stage}-reference", workspace / f"{stage}-resumed"
            launch(workspace / "run.yaml", *_overrides(workspace, stage, ref), log=workspace / f"{stage}-reference.log",
                   timeout=RUN_TIMEOUT_S)  # fmt: skip
            _launch_and_kill(workspace, stage, res, after=f"checkpoint-{SAVE_STEPS}")
            before = {r: len(_read_jsonl(res / f"batches.rank{r}.jsonl")) for r in (0, 1)}
            launch(workspace / "run.yaml", *_overrides(workspace, stage, res), "training.resume_from_checkpoint=auto",
                   log=workspace / f"{stage}-resumed.log", timeout=RUN_TIMEOUT_S)  # fmt: skip
            done[stage] = (ref, res, before)
        return done[stage]

    return get


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _losses(out: Path) -> dict[int, float]:
    state = json.loads((out / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def _resumed_from(workspace: Path, stage: str) -> int:
    log = (workspace / f"{stage}-resumed.log").read_text(encoding="utf-8")
    marker = "resume_from_checkpoint=auto: resuming from "
    assert marker in log, f"the resumed run did not log where it resumed from; see {stage}-resumed.log"
    path = log.split(marker, 1)[1].split()[0]
    return int(Path(path).name.split("-")[1])


@pytest.mark.parametrize("stage", STAGES)
def test_resume_auto_continues_from_the_newest_complete_checkpoint(runs, workspace, stage):
    ref, res, _ = runs(stage)
    k = _resumed_from(workspace, stage)
    assert k in (3, 6), f"resumed from checkpoint-{k}; the kill came after checkpoint-3 and before the end"
    assert not list(res.glob("tmp-checkpoint-*")), "a staging directory survived the resumed run"
    assert sorted(p.name for p in res.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6", "checkpoint-9"]


@pytest.mark.parametrize("stage", STAGES)
def test_losses_after_resume_equal_the_uninterrupted_run(runs, workspace, stage):
    ref, res, _ = runs(stage)
    k = _resumed_from(workspace, stage)
    reference, resumed = _losses(ref), _losses(res)
    assert sorted(reference) == sorted(resumed) == list(range(1, MAX_STEPS + 1))
    after = list(range(k + 1, MAX_STEPS + 1))
    assert [resumed[s] for s in after] == pytest.approx([reference[s] for s in after], abs=1e-6, rel=0), (
        f"steps {after}: resumed {[resumed[s] for s in after]} vs uninterrupted {[reference[s] for s in after]}"
    )


@pytest.mark.parametrize("stage", STAGES)
def test_data_order_continues_where_it_stopped(runs, workspace, stage):
    ref, res, before = runs(stage)
    k = _resumed_from(workspace, stage)
    for r in (0, 1):
        reference = _read_jsonl(ref / f"batches.rank{r}.jsonl")
        lines = _read_jsonl(res / f"batches.rank{r}.jsonl")
        after_resume = lines[before[r]:]
        # the resumed run starts at step k (0-based step index of the next batch), not at 0
        assert [x["step"] for x in after_resume] == list(range(k, MAX_STEPS)), f"rank {r}: {after_resume}"
        expected = {x["step"]: x["digest"] for x in reference}
        assert {x["step"]: x["digest"] for x in after_resume} == {s: expected[s] for s in range(k, MAX_STEPS)}
        # and the killed run had trained on the same batches as the reference before it died
        killed = {x["step"]: x["digest"] for x in lines[: before[r]]}
        assert killed == {s: expected[s] for s in killed}, f"rank {r}"
