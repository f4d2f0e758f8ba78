"""A 2-process CPU run outside Slurm stops cleanly on request and resumes exactly: rank 0 pauses after
step 2 (``PACKLORA_TEST_FAULT=0:2:pause``) until the test creates ``PACKLORA_STOP_FILE``; both ranks then
save ``checkpoint-2`` and exit 75, which deepspeed passes on; rank 0 acknowledges the checkpoint.
``resume_from_checkpoint=auto`` then finishes the run with the one-node reference's losses.

    python -m pytest -m distributed tests/distributed/test_stop_on_request.py -q
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from launching import REPO_ROOT, launch, launch_env
from multinode import MAX_STEPS, step_losses, tensorboard_losses

pytestmark = pytest.mark.distributed
RUN_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def stopped(multinode_config, tmp_path_factory):
    """(output_dir, exit code, output, stop file) of the run stopped after step 2."""
    ws = tmp_path_factory.mktemp("stop_on_request")
    out, stop = ws / "out", ws / "stop"
    env = {**launch_env(), "PACKLORA_STOP_FILE": str(stop), "PACKLORA_TEST_FAULT": "0:2:pause"}
    cmd = [sys.executable, "-m", "packlora.cli", "launch", str(multinode_config), "--nproc-per-node", "2",
           f"output_dir={out}"]  # fmt: skip
    lines = []
    with subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          errors="replace") as proc:  # fmt: skip
        deadline = time.monotonic() + RUN_TIMEOUT_S
        try:
            for line in proc.stdout:
                lines.append(line)
                if "PACKLORA_TEST_FAULT: rank 0 pauses after step 2" in line:
                    stop.touch()
                if time.monotonic() > deadline:
                    break
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    return out, proc.returncode, "".join(lines), stop


def test_a_stop_request_saves_a_complete_checkpoint_and_exits_75(stopped):
    out, code, log, stop = stopped
    assert code == 75, log[-4000:]
    assert f"stopped on request (stop file {stop}) at step 2 of {MAX_STEPS}: complete checkpoint {out}/checkpoint-2" in log
    assert json.loads((out / "checkpoint-2" / "packlora_complete.json").read_text()) == {"global_step": 2}
    assert json.loads(stop.with_name("stop.checkpoint").read_text()) == {"global_step": 2, "checkpoint": f"{out}/checkpoint-2"}
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "adapter_model.safetensors").exists()  # no final save: the run is not finished
    assert [[s for s, _ in f] for f in tensorboard_losses(out)] == [[1, 2]]


def test_resume_after_the_stop_gives_the_uninterrupted_losses(stopped, multinode_config, one_node_reference):
    out = stopped[0]
    launch(multinode_config, "--nproc-per-node", "2", f"output_dir={out}", "training.resume_from_checkpoint=auto",
           log=out.parent / "resumed.log", timeout=RUN_TIMEOUT_S)  # fmt: skip
    assert f"resuming from {out}/checkpoint-2" in (out.parent / "resumed.log").read_text()
    assert step_losses(out) == step_losses(one_node_reference)
