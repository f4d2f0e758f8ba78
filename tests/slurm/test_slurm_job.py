"""A real Slurm batch job trains the tiny model: ``packlora slurm CONFIG ... --submit --wait``.

Needs a running cluster (``../shared/slurm/start-slurm.sh``, as ``.ci/run`` does) and
``SLURM_CONF``; skipped cleanly without ``sbatch`` or ``SLURM_CONF``. One job per layout, each
2 CPU processes with gloo on the single node, 4 steps (40-70 s each on 2 cores):

* ``srun``: srun starts both training processes; ranks come from SLURM_PROCID/SLURM_LOCALID/
  SLURM_STEP_NUM_TASKS (``training.distributed``);
* ``torchrun``: srun starts one torchrun per node, which starts the 2 processes.
* ``deepspeed``: srun starts one deepspeed per node, with the hostfile the job writes and ``--no_ssh``.

    SLURM_CONF=/tmp/packlora-slurm/etc/slurm.conf python -m pytest -m slurm tests/slurm -q
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from launching import launch_env
from multinode import MAX_STEPS, SAVE_STEPS, VOCAB, needs_slurm, write_run_config
from tiny_assets import SHISHUO_CHATS, build_chatml_tokenizer

pytestmark = needs_slurm()

REPO_ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 600
RECORDS = 32
# Full shapes of the LoRA tensors: hidden 64, 4 heads of 16, 2 KV heads -> v_proj out 32; r = 4.
EXPECTED_LORA_SHAPES = {
    f"base_model.model.model.layers.{i}.self_attn.{proj}.lora_{ab}.weight": shape
    for i in range(2)
    for proj, ab, shape in (("q_proj", "A", (4, 64)), ("q_proj", "B", (64, 4)),
                            ("v_proj", "A", (4, 64)), ("v_proj", "B", (32, 4)))
}  # fmt: skip


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Tokenizer, 32 real chats and the run YAML; under the module's temp dir, which the job shares."""
    ws = tmp_path_factory.mktemp("slurm_job")
    build_chatml_tokenizer(ws / "tokenizer", vocab_size=VOCAB)
    lines = SHISHUO_CHATS.read_text(encoding="utf-8").splitlines()[:RECORDS]
    (ws / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    write_run_config(ws, max_seq_length=512, ddp_timeout=120)
    return ws


@pytest.fixture(scope="module")
def job(workspace):
    """``job(layout)`` -> (output_dir, packlora's stdout, the Slurm log text); submitted on first use."""
    done: dict[str, tuple[Path, str, str]] = {}

    def get(layout: str):
        if layout not in done:
            out = workspace / layout
            cmd = [sys.executable, "-m", "packlora.cli", "slurm", str(workspace / "run.yaml"), f"output_dir={out}",
                   "--nodes", "1", "--gpus-per-node", "0", "--nproc-per-node", "2", "--launcher", layout,
                   "--time", "10", "--submit", "--wait"]  # fmt: skip
            proc = subprocess.run(cmd, cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
            logs = sorted((out / "slurm").glob("slurm-*.out"))
            log = logs[-1].read_text(encoding="utf-8", errors="replace") if logs else "<no Slurm log>"
            if proc.returncode != 0:
                pytest.fail(f"{layout}: `{' '.join(cmd)}` exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n"
                            f"Slurm log (end):\n{log[-6000:]}")
            done[layout] = (out, proc.stdout, log)
        return done[layout]

    return get


LAYOUTS = ("srun", "torchrun", "deepspeed")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_slurm_job_checkpoints_every_lora_tensor_at_full_shape(job, layout):
    from safetensors.torch import load_file

    out, _, _ = job(layout)
    for ckpt in (out / f"checkpoint-{SAVE_STEPS}", out / f"checkpoint-{MAX_STEPS}", out):
        tensors = load_file(str(ckpt / "adapter_model.safetensors"))
        assert {k: tuple(v.shape) for k, v in tensors.items()} == EXPECTED_LORA_SHAPES, ckpt
    assert (out / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").is_file()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_slurm_job_ran_two_ranks_with_world_size_two(job, layout):
    out, _, _ = job(layout)
    for rank in (0, 1):
        lines = [json.loads(x) for x in (out / f"batches.rank{rank}.jsonl").read_text().splitlines() if x.strip()]
        assert [x["step"] for x in lines] == list(range(MAX_STEPS))
        assert {(x["rank"], x["world_size"]) for x in lines} == {(rank, 2)}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_slurm_job_logs_every_loss_to_tensorboard(job, layout):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = job(layout)
    events = list((out / "runs").rglob("events.out.tfevents.*"))
    assert events, f"no TensorBoard events under {out / 'runs'}"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, MAX_STEPS + 1))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_slurm_job_prints_checkpoint_and_log_paths_at_start_and_end(job, layout):
    out, stdout, log = job(layout)
    paths = f"checkpoints in {out}, TensorBoard logs in {out}/runs"
    assert f" queued: Slurm log {out}/slurm/slurm-" in stdout and f"; {paths}\n" in stdout, stdout
    assert f"ended with exit code 0: {paths}\n" in stdout, stdout
    started = [line for line in log.splitlines() if " started; checkpoints in " in line]
    finished = [line for line in log.splitlines() if " finished with exit code 0; checkpoints in " in line]
    assert len(started) == len(finished) == 1, log[-3000:]
    assert f"checkpoints in {out} TensorBoard logs in {out}/runs Slurm log {out}/slurm/slurm-" in finished[0]
    # the training processes print them too (rank 0, at start and at the end)
    assert f"checkpoints -> {out}" in log and f"checkpoint {out}" in log


def test_slurm_job_chose_a_port_outside_the_ephemeral_range(job):
    from packlora.launcher.ports import read_ephemeral_range

    _, _, log = job("srun")
    [line] = [x for x in log.splitlines() if "rendezvous" in x]
    port = int(line.rsplit(":", 1)[1])
    low, high = read_ephemeral_range()
    assert not low <= port <= high and port >= 20000, line
