"""A rank that dies or hangs ends a real 2-process CPU run with a non-zero exit, in bounded time.

The test hook ``PACKLORA_TEST_FAULT=RANK:STEP:exit|kill|hang`` (``training.distributed``) makes rank 1
``os._exit(17)``, die of SIGKILL or stop answering collectives after optimizer step 2 of 50. Measured behaviour:

* ``exit``: the launcher (deepspeed's ``launch.py`` polls its children; torchrun's agent likewise)
  sees a child exit non-zero and kills its siblings at once;
* ``hang``: rank 0 blocks in the next gloo collective until the collective timeout
  (``training.ddp_timeout``, here 20 s, passed by accelerate to ``deepspeed.init_distributed``)
  raises, rank 0 exits non-zero, and the launcher kills the hung rank 1;
* ``kill``: rank 1 dies of SIGKILL (as the out-of-memory killer does it); ``packlora launch`` reads
  the launcher's report and ends with the out-of-memory hint (``launcher.commands.OOM_HINT``).

And ``kill`` (SIGTERM) on a running ``packlora launch`` stops its whole process tree: exit 143,
one line, no traceback, no process of the run left (``launcher.supervise``).

    python -m pytest -m distributed tests/launcher/test_rank_failure.py -q
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny_assets import tiny_chat_run

pytestmark = pytest.mark.distributed

REPO_ROOT = Path(__file__).resolve().parents[2]
COLLECTIVE_TIMEOUT_S = 20
MAX_STEPS = 50  # far more than the fault step: a run that ends without the fault would take longer


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    return tiny_chat_run(tmp_path_factory.mktemp("rank_failure"), "out", {
        "max_steps": MAX_STEPS, "save_steps": 1000, "logging_steps": 1, "learning_rate": 1.0e-3,
        "per_device_train_batch_size": 1, "ddp_timeout": COLLECTIVE_TIMEOUT_S})


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


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_a_rank_killed_by_signal_9_ends_the_run_with_the_out_of_memory_hint(run_config, launcher):
    code, seconds, log = _run(run_config, launcher, "1:2:kill")

    assert "PACKLORA_TEST_FAULT: rank 1 kills after step 2" in log
    assert code != 0, log[-4000:]
    assert ("packlora launch: a training process was killed by signal 9 (likely out of memory): lower "
            "training.per_device_train_batch_size or data.max_seq_length") in log, log[-4000:]
    assert seconds < 15, f"the launcher exited {seconds:.0f} s after rank 1 was killed:\n{log[-4000:]}"


def test_sigterm_to_a_running_launch_stops_every_process_it_started(run_config, tmp_path):
    """``kill`` (SIGTERM) on ``packlora launch`` mid-training: exit 143, one line, no traceback, and no
    process of the run left (deepspeed's runner, its ``launch.py`` and both ranks). Rank 1 pauses
    after step 1 (the stop file never appears), so the run is surely still training when the signal
    comes, however loaded the machine."""
    import signal

    import psutil

    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", PACKLORA_TEST_FAULT="1:1:pause", PACKLORA_STOP_FILE=str(tmp_path / "never"))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TENSORBOARD_LOGGING_DIR"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "packlora.cli", "launch", str(run_config), "--nproc-per-node", "2",
           f"output_dir={tmp_path / 'out'}"]  # fmt: skip
    with subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, errors="replace") as proc:  # fmt: skip
        try:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if "PACKLORA_TEST_FAULT: rank 1 pauses after step 1" in line:
                    break
            else:
                pytest.fail(f"the run ended before the pause (exit {proc.wait()}):\n{''.join(lines)[-4000:]}")
            tree = psutil.Process(proc.pid).children(recursive=True)
            ranks = [p for p in tree if "packlora.train" in " ".join(p.cmdline())]
            assert len(ranks) >= 2, [p.cmdline() for p in tree]
            proc.send_signal(signal.SIGTERM)
            lines += proc.stdout.readlines()  # until packlora launch has exited and closed it
            code = proc.wait(timeout=60)
        except BaseException:
            proc.kill()
            raise
    log = "".join(lines)
    _, alive = psutil.wait_procs(tree, timeout=5)  # already gone: packlora launch waited for them
    left = [c for c in map(_cmdline, psutil.process_iter()) if str(run_config) in " ".join(c)]

    assert code == 143, log[-4000:]
    assert not alive and not left, (alive, left)
    assert log.splitlines()[-1].startswith("packlora launch: stopped by SIGTERM: sent SIGTERM to the "), log[-2000:]
    assert "Traceback" not in log, log[-4000:]


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:  # psutil.Error: gone or not ours to read
        return []
