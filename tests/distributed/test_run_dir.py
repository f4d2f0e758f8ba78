"""The README's own sequence cannot mix two runs (issue 24): a first run (as ``scripts/demo.sh``), then
``packlora launch CONFIG training.max_steps=N`` into the same ``output_dir``.

The second launch is refused before any process starts, naming the directory and the two ways out;
with ``--overwrite`` the old run is deleted first and the new run's checkpoints are the only ones
left. The config sets no batch size, so both runs train one packed row per micro-batch (packlora's
default), which the start-up log states. Two real 2-process DeepSpeed runs on CPU.

    python -m pytest -m distributed tests/distributed/test_run_dir.py -q
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launching import REPO_ROOT, launch, launch_env
from tiny_assets import tiny_chat_run

pytestmark = pytest.mark.distributed

FIRST_STEPS, SECOND_STEPS, SAVE_STEPS = 4, 2, 2


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """A tiny run without any batch size: 32 real chats, checkpoints every 2 steps, at most 2 kept."""
    return tiny_chat_run(tmp_path_factory.mktemp("run_dir"), "run", {
        "max_steps": FIRST_STEPS, "save_steps": SAVE_STEPS, "save_total_limit": 2, "learning_rate": 1.0e-3})


def _checkpoints(run: Path) -> dict[str, int]:
    return {p.name: json.loads((p / "trainer_state.json").read_text())["global_step"]
            for p in sorted(run.glob("checkpoint-*"))}


def test_a_second_launch_into_a_run_is_refused_before_any_process_and_overwrite_replaces_the_run(config, tmp_path):
    run = config.parent / "run"
    first = launch(config, "--nproc-per-node", "2", log=tmp_path / "first.log")
    assert "batch arithmetic: 1 rows/micro-batch x 512 tokens/row x 2 processes" in first.stdout
    assert "estimated memory per rank for one micro-batch: logits" in first.stdout
    assert _checkpoints(run) == {"checkpoint-2": 2, "checkpoint-4": 4}
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}

    refused = subprocess.run([sys.executable, "-m", "packlora.cli", "launch", str(config), "--nproc-per-node", "2",
                              f"training.max_steps={SECOND_STEPS}"], cwd=REPO_ROOT, env=launch_env(),
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert f"output_dir: {run} already holds a run (checkpoint-2, checkpoint-4, packlora_config.yaml)" in refused.stderr
    assert "Give a new output_dir" in refused.stderr and "add --overwrite to delete the old run first" in refused.stderr
    assert "deepspeed" not in refused.stdout  # refused before the command was even printed, let alone run
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir()} == before

    second = launch(config, "--nproc-per-node", "2", f"training.max_steps={SECOND_STEPS}", "--overwrite",
                    log=tmp_path / "second.log")
    assert f"--overwrite: deleted the old run in {run}" in second.stderr
    assert _checkpoints(run) == {"checkpoint-2": 2}  # the new run's own, none of the old run's
    assert json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["max_steps"] == SECOND_STEPS
    events = [p for p in (run / "runs").rglob("events.out.tfevents.*")]
    assert len(events) == 1, events  # one TensorBoard curve, not two over the same steps
