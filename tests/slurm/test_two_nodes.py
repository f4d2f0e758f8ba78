"""Real two-node Slurm jobs: ``packlora slurm CONFIG --nodes 2 --gpus-per-node 0 --nproc-per-node 1
--submit --wait`` on a local cluster with nodes pl1 and pl2 (``NODES=2 ../shared/slurm/start-slurm.sh``,
as ``.ci/run`` does). Skipped cleanly without ``sbatch``/``SLURM_CONF``, or with fewer than two nodes.

* with each per-node launcher (torchrun, deepspeed ``--no_ssh`` with the job's hostfile, srun one task
  per process) the per-step losses equal the one-node, two-process run's, bit for bit
  (``tests/multinode.py`` says why), every rank runs on its own node, and every srun step got the
  CPUs asked for (``SLURM_CPUS_PER_TASK`` inside the step; this cluster runs ``TaskPlugin=task/none``,
  so the affinity mask is not narrowed and is not what is checked);
* a node whose training process dies ends the job FAILED within the collective timeout, both nodes'
  tasks exit non-zero, and torchrun's log names the rank that died first;
* a job warned with USR1 mid-run saves a complete checkpoint on every rank, requeues itself and resumes
  from it: the losses equal the uninterrupted run's and TensorBoard's steps continue without a gap or
  a duplicate. Slurm holds a requeued job for ``cred_expire`` (120 s by default) before it starts
  again, and the test waits for that, as a real job does: releasing it early races slurmd, which
  still holds the first run's revoked credential and kills the new start ("Job credential revoked").

The final state of a job is read with ``scontrol show job`` while and right after it ends: start the
cluster with ``MIN_JOB_AGE=300`` (``.ci/run`` does) so the record outlives the test's look.

    SLURM_CONF=/tmp/packlora-slurm/etc/slurm.conf python -m pytest -m slurm tests/slurm/test_two_nodes.py -q
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from launching import REPO_ROOT, launch_env
from multinode import COLLECTIVE_TIMEOUT_S, MAX_STEPS, needs_slurm, placements, step_losses, tensorboard_losses

JOB_TIMEOUT_S = 600
CPUS_PER_PROCESS = 2  # what every srun step must see; both local nodes have 2 CPUs


def _slurm_nodes() -> list[str]:
    if shutil.which("sbatch") is None or not os.environ.get("SLURM_CONF"):
        return []
    proc = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N"], capture_output=True, text=True, timeout=30)
    return sorted(set(proc.stdout.split()))


_NODES = _slurm_nodes()
pytestmark = [
    *needs_slurm(),
    pytest.mark.skipif(
        bool(os.environ.get("SLURM_CONF")) and len(_NODES) < 2,
        reason=f"needs a Slurm cluster with 2 nodes, this one has {len(_NODES)} ({' '.join(_NODES)}); "
        "start it with NODES=2 ../shared/slurm/start-slurm.sh",
    ),
]


@dataclass
class Job:
    """What one ``packlora slurm --submit --wait`` left: exit code, output, log, the states Slurm showed."""

    out: Path
    code: int
    stdout: str
    log: str
    job_id: str
    states: list[str] = field(default_factory=list)
    restarts: int = 0
    ended_at: float = 0.0


def _show_job(job_id: str) -> dict[str, str]:
    proc = subprocess.run(["scontrol", "--oneliner", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    return dict(w.split("=", 1) for w in proc.stdout.split() if "=" in w) if proc.returncode == 0 else {}


def _log_text(out: Path) -> str:
    logs = sorted((out / "slurm").glob("slurm-*.out"))
    return logs[-1].read_text(encoding="utf-8", errors="replace") if logs else ""


def submit(config: Path, out: Path, *flags: str, env: dict[str, str] | None = None, on_poll=None) -> Job:
    """Run ``packlora slurm CONFIG output_dir=OUT --nodes 2 --gpus-per-node 0 --nproc-per-node 1 FLAGS
    --submit --wait``; while it waits, read the job's state every 0.5 s and call ``on_poll(job_id, info, log)``."""
    cmd = [sys.executable, "-m", "packlora.cli", "slurm", str(config), f"output_dir={out}", "--nodes", "2",
           "--gpus-per-node", "0", "--nproc-per-node", "1", "--time", "15", *flags, "--submit", "--wait"]  # fmt: skip
    lines: list[str] = []
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**launch_env(), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    job_id, states, restarts = "", [], 0
    deadline = time.monotonic() + JOB_TIMEOUT_S
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                pytest.fail(f"`{' '.join(cmd)}` still running after {JOB_TIMEOUT_S} s:\n{''.join(lines)}\n{_log_text(out)[-4000:]}")
            if not job_id:
                found = re.search(r"^job (\d+) queued", "".join(lines), re.M)
                job_id = found.group(1) if found else ""
            if job_id:
                info = _show_job(job_id)
                if info.get("JobState") and (not states or states[-1] != info["JobState"]):
                    states.append(info["JobState"])
                restarts = max(restarts, int(info.get("Restarts", 0)))
                if on_poll is not None:
                    on_poll(job_id, info, _log_text(out))
            time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        reader.join(timeout=30)
    ended_at = time.time()
    if job_id:  # the final state: the record lingers MinJobAge seconds after the end
        info = _show_job(job_id)
        if info.get("JobState") and states[-1:] != [info["JobState"]]:
            states.append(info["JobState"])
        restarts = max(restarts, int(info.get("Restarts", 0)))
    return Job(out, proc.returncode, "".join(lines), _log_text(out), job_id, states, restarts, ended_at)


def _passed(job: Job) -> Job:
    if job.code != 0:
        pytest.fail(f"job {job.job_id} exited {job.code}, states {job.states}\n{job.stdout}\nSlurm log (end):\n{job.log[-6000:]}")
    return job


@pytest.fixture(scope="module")
def layout_job(multinode_config, tmp_path_factory):
    """``layout_job(launcher)`` -> the finished two-node job with that per-node launcher; run on first use."""
    done: dict[str, Job] = {}
    root = tmp_path_factory.mktemp("two_nodes")

    def get(launcher: str) -> Job:
        if launcher not in done:
            done[launcher] = _passed(submit(multinode_config, root / launcher, "--launcher", launcher,
                                            "--cpus-per-process", str(CPUS_PER_PROCESS)))  # fmt: skip
        return done[launcher]

    return get


LAUNCHERS = ("torchrun", "deepspeed", "srun")


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_two_node_job_gives_the_one_node_losses(layout_job, one_node_reference, launcher):
    job = layout_job(launcher)
    reference = step_losses(one_node_reference)
    assert [s for s, _, _ in reference] == list(range(1, MAX_STEPS + 1))
    assert step_losses(job.out) == reference  # bit-identical: losses and gradient norms, every step
    assert tensorboard_losses(job.out) == tensorboard_losses(one_node_reference)
    assert job.states[-1] == "COMPLETED", job.states


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_each_rank_runs_on_its_own_node_with_the_cpus_asked_for(layout_job, launcher):
    place = placements(layout_job(launcher).log)
    assert sorted(place) == [0, 1], layout_job(launcher).log[-4000:]
    assert sorted(p["node"] for p in place.values()) == _NODES[:2]
    for rank, p in place.items():
        assert (p["world"], p["local"]) == (2, 0), p
        assert p["slurm_cpus_per_task"] == str(CPUS_PER_PROCESS), f"rank {rank}: {p}"


def test_a_node_whose_training_process_dies_ends_the_job_failed(multinode_config, tmp_path):
    job = submit(multinode_config, tmp_path / "out", "--launcher", "torchrun",
                 env={"PACKLORA_TEST_FAULT": "1:2:exit"})  # fmt: skip
    log = job.log

    fault = re.search(r"PACKLORA_TEST_FAULT: rank 1 exits after step 2 \(at ([\d.]+)\)", log)
    assert fault, f"the fault never fired:\n{log[-4000:]}"
    assert job.code != 0 and job.states[-1] == "FAILED", (job.code, job.states)
    seconds = job.ended_at - float(fault.group(1))
    assert seconds < COLLECTIVE_TIMEOUT_S, f"the job ended {seconds:.0f} s after rank 1 died"
    # both nodes' tasks (one torchrun per node: task = node index) exited non-zero
    nodes = {r: p["node"] for r, p in placements(log).items()}
    for task in (0, 1):
        assert re.search(rf"srun: error: {nodes[task]}: task {task}: (Exited with exit code [1-9]|Terminated|Killed)",
                         log), f"task {task} on {nodes[task]} did not fail:\n{log[-4000:]}"  # fmt: skip
    # torchrun on the dead rank's node names it as the first failure, with its exit code
    assert re.search(r"Root Cause \(first observed failure\):\n\[0\]:\n(?:  .*\n)*?  rank\s*: 1 \(local_rank: 0\)\n"
                     r"  exitcode\s*: 17 ", log), log[-4000:]  # fmt: skip


@pytest.fixture(scope="module")
def preempted(multinode_config, tmp_path_factory):
    """A two-node torchrun job whose rank 0 pauses after step 2 (``PACKLORA_TEST_FAULT=0:2:pause``, until the
    stop file exists) and is then warned like before a time limit: ``scancel --signal=USR1 --batch``."""
    signalled: list[str] = []

    def on_poll(job_id: str, info: dict, log: str) -> None:
        if not signalled and "PACKLORA_TEST_FAULT: rank 0 pauses after step 2" in log:
            subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True, timeout=30)
            signalled.append(job_id)

    out = tmp_path_factory.mktemp("preempted") / "out"
    job = submit(multinode_config, out, "--launcher", "torchrun", env={"PACKLORA_TEST_FAULT": "0:2:pause"},
                 on_poll=on_poll)  # fmt: skip
    assert signalled, f"the run never paused at step 2:\n{job.log[-4000:]}"
    return _passed(job)


def test_a_warned_job_checkpoints_requeues_and_completes(preempted):
    log = preempted.log
    assert f"packlora: job {preempted.job_id} got USR1" in log
    assert f'stopped cleanly: {{"global_step": 2, "checkpoint": "{preempted.out}/checkpoint-2"}}' in log
    assert f"packlora: requeueing job {preempted.job_id}" in log
    assert "resume_from_checkpoint=auto: resuming from " + str(preempted.out / "checkpoint-2") in log
    assert preempted.restarts == 1 and preempted.states[-1] == "COMPLETED", (preempted.restarts, preempted.states)
    assert log.count(f"packlora: job {preempted.job_id} started;") == 2  # the log was appended to, not truncated


def test_the_stop_checkpoint_is_complete_on_every_rank(preempted):
    ckpt = preempted.out / "checkpoint-2"
    assert json.loads((ckpt / "packlora_complete.json").read_text()) == {"global_step": 2}
    shards = sorted(p.name for p in (ckpt / "global_step2").iterdir())
    assert shards == ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                      "zero_pp_rank_1_mp_rank_00_optim_states.pt"]  # fmt: skip
    assert not list(preempted.out.glob("tmp-checkpoint-*"))


def test_losses_after_the_requeue_equal_the_uninterrupted_run(preempted, one_node_reference):
    assert step_losses(preempted.out) == step_losses(one_node_reference)


def test_tensorboard_steps_continue_after_the_requeue_without_gap_or_duplicate(preempted, one_node_reference):
    [reference] = tensorboard_losses(one_node_reference)
    before, after = tensorboard_losses(preempted.out)  # one event file per run of the job
    assert [s for s, _ in before] == [1, 2] and [s for s, _ in after] == list(range(3, MAX_STEPS + 1))
    assert before + after == reference
