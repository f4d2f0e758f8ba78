"""A rank that dies or hangs ends a real 2-process CPU run with a non-zero exit, in bounded time.

The test hook ``PACKLORA_TEST_FAULT=RANK:STEP:exit|hang`` (``training.distributed``) makes rank 1
``os._exit(17)`` or stop answering collectives after optimizer step 2 of 50. Measured behaviour:

* ``exit``: the launcher (deepspeed's ``launch.py`` polls its children; torchrun's agent likewise)
  sees a child exit non-zero and kills its siblings at once;
* ``hang``: rank 0 blocks in the next gloo collective until the collective timeout
  (``training.ddp_timeout``, here 20 s, passed by accelerate to ``deepspeed.init_distributed``)
  raises, rank 0 exits non-zero, and the launcher kills the hung rank 1.

    python -m pytest -m distributed tests/launcher/test_rank_failure.py -q
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tiny_assets import SHISHUO_CHATS, build_chatml_tokenizer, tiny_qwen2_config

pytestmark = pytest.mark.distributed

REPO_ROOT = Path(__file__).resolve().parents[2]
COLLECTIVE_TIMEOUT_S = 20
MAX_STEPS = 50  # far more than the fault step: a run that ends without the fault would take longer


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("rank_failure")
    build_chatml_tokenizer(ws / "tokenizer", vocab_size=400)
    lines = SHISHUO_CHATS.read_text(encoding="utf-8").splitlines()[:32]
    (ws / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    config = {
        "output_dir": str(ws / "out"),
        "seed": 0,
        "deepspeed": "zero2.json",
        "model": {"config": tiny_qwen2_config(400), "tokenizer": str(ws / "tokenizer")},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": [str(ws / "chats.jsonl")], "max_seq_length": 512, "overflow": "drop",
                 "cache_dir": str(ws / "cache")},
        "training": {"max_steps": MAX_STEPS, "save_steps": 1000, "logging_steps": 1, "learning_rate": 1.0e-3,
                     "per_device_train_batch_size": 1, "ddp_timeout": COLLECTIVE_TIMEOUT_S},
    }  # fmt: skip
    path = ws / "run.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def _run(config: Path, launcher: str, fault: str) -> tuple[int, float, str]:
    """Run ``packlora launch`` with the fault; returns (exit code, seconds from the fault to the
    launcher's exit, output). Output is read as it comes, to time the fault line."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    env["PACKLORA_TEST_FAULT"] = fault
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TENSORBOARD_LOGGING_DIR"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "packlora.cli", "launch", str(config), "--launcher", launcher,
           "--nproc-per-node", "2", f"output_dir={config.parent / (launcher + fault.replace(':', '_'))}"]  # fmt: skip
    lines, fault_at = [], None
    with subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as proc:  # fmt: skip
        try:
            for line in proc.stdout:
                lines.append(line)
                if fault_at is None and "PACKLORA_TEST_FAULT: rank" in line:
                    fault_at = time.monotonic()
            # Only keeps a regression from hanging the suite; the asserts are much tighter.
            proc.wait(timeout=60)
        except BaseException:
            proc.kill()
            raise
    log = "".join(lines)
    if fault_at is None:
        pytest.fail(f"the fault never fired (exit {proc.returncode}):\n{log[-4000:]}")
    return proc.returncode, time.monotonic() - fault_at, log


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_a_rank_that_exits_ends_the_run_non_zero_at_once(run_config, launcher):
    code, seconds, log = _run(run_config, launcher, "1:2:exit")

    assert "PACKLORA_TEST_FAULT: rank 1 exits after step 2" in log
    assert code != 0, log[-4000:]
    assert seconds < 15, f"the launcher exited {seconds:.0f} s after rank 1 died:\n{log[-4000:]}"


def test_a_hung_rank_ends_the_run_non_zero_after_the_collective_timeout(run_config):
    code, seconds, log = _run(run_config, "deepspeed", "1:2:hang")

    assert "PACKLORA_TEST_FAULT: rank 1 hangs after step 2" in log
    assert code != 0, log[-4000:]
    assert f"Timed out waiting {COLLECTIVE_TIMEOUT_S * 1000}ms" in log, log[-4000:]
    # the timeout, not anything earlier, ended it; and the launcher did not linger afterwards
    assert COLLECTIVE_TIMEOUT_S - 2 < seconds < COLLECTIVE_TIMEOUT_S + 20, f"{seconds:.0f} s after the hang"
