"""The tiny run that every two-node test trains, its one-node reference, and readers for what a run
leaves behind (per-step losses, TensorBoard steps, the per-rank placement lines).

Every two-node run (Slurm with each launcher, two plain torchrun process trees, the pre-empted and
requeued job) has world size 2 and the same data order as the reference: one node, two processes,
``packlora launch --nproc-per-node 2``. Under gloo on CPU in fp32 their per-step losses are
bit-identical: with two ranks every all-reduce sums the same two numbers (a + b == b + a), each
process runs one thread (``OMP_NUM_THREADS=1``) on the same CPU, and the data order depends only
on the rank and the seed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from tiny_assets import build_chatml_tokenizer, tiny_qwen2_config

VOCAB, RECORDS = 400, 24
MAX_STEPS, SAVE_STEPS = 4, 2
COLLECTIVE_TIMEOUT_S = 60  # training.ddp_timeout; a dead node must end the job well inside it


def needs_slurm() -> list:
    """The marks of a module of real Slurm jobs: ``slurm``, ``distributed``, and a clean skip without
    ``sbatch`` or ``SLURM_CONF``."""
    return [
        pytest.mark.slurm,
        pytest.mark.distributed,
        pytest.mark.skipif(
            shutil.which("sbatch") is None or not os.environ.get("SLURM_CONF"),
            reason="needs a Slurm cluster: sbatch on PATH and SLURM_CONF set (see ../shared/slurm/start-slurm.sh)",
        ),
    ]


def build_workspace(ws: Path) -> Path:
    """Tokenizer, 24 short chats (124 tokens each, two to a 256-token row) and ``run.yaml`` in ``ws``;
    returns the config path. Steps take ~0.1 s: start-up dominates every run."""
    build_chatml_tokenizer(ws / "tokenizer", vocab_size=VOCAB)
    chats = [
        {"messages": [
            {"role": "user", "content": f"Rewrite sentence {i} in the style of an old novel, please: "
                                        f"the quick brown fox jumps over the lazy dog {i} times."},
            {"role": "assistant", "content": f"Once upon a time a scholar who loved wine and poems saw "
                                             f"the fox leap {i} times over the dog."},
        ]}
        for i in range(RECORDS)
    ]  # fmt: skip
    (ws / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats), encoding="utf-8")
    return write_run_config(ws, max_seq_length=256, ddp_timeout=COLLECTIVE_TIMEOUT_S)


def write_run_config(ws: Path, *, max_seq_length: int, ddp_timeout: int) -> Path:
    """``ws/run.yaml``: the tiny LoRA run (2-layer Qwen2, ZeRO-2, MAX_STEPS steps, a checkpoint every
    SAVE_STEPS) over ``ws/tokenizer`` and ``ws/chats.jsonl``, logging each batch's digest; returns its path."""
    config = {
        "output_dir": str(ws / "unused"),
        "seed": 0,
        "deepspeed": "zero2.json",
        "log_batch_digests": True,
        "model": {"config": tiny_qwen2_config(VOCAB), "tokenizer": str(ws / "tokenizer")},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": [str(ws / "chats.jsonl")], "max_seq_length": max_seq_length, "overflow": "drop",
                 "cache_dir": str(ws / "cache")},
        "training": {"max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "logging_steps": 1,
                     "learning_rate": 1.0e-2, "per_device_train_batch_size": 1, "ddp_timeout": ddp_timeout},
        "decoding": {"max_new_tokens": 8},
    }  # fmt: skip
    path = ws / "run.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def step_losses(out: Path) -> list[tuple[int, float, float]]:
    """``(step, loss, grad_norm)`` of every logged step, unrounded, from ``checkpoint-MAX``'s trainer state
    (a resumed run's state carries the steps before the resume too)."""
    state = json.loads((out / f"checkpoint-{MAX_STEPS}" / "trainer_state.json").read_text())
    return [(e["step"], e["loss"], e["grad_norm"]) for e in state["log_history"] if "loss" in e]


def tensorboard_losses(out: Path) -> list[list[tuple[int, float]]]:
    """``train/loss`` ``(step, value)`` pairs of each TensorBoard event file under ``out/runs``, one list per
    file in the order they were written. Each file is read on its own (EventAccumulator on a directory
    silently drops the older of two events with the same step, which would hide a duplicate)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted((out / "runs").rglob("events.out.tfevents.*"), key=lambda p: int(p.name.split(".")[3]))
    per_file = []
    for f in files:
        acc = EventAccumulator(str(f), purge_orphaned_data=False)
        acc.Reload()
        per_file.append([(e.step, e.value) for e in acc.Scalars("train/loss")])
    return per_file


_PLACE = re.compile(r"packlora\.place: rank (\d+) of (\d+) \(local rank (\d+)\) on (\S+): (\d+) CPU\(s\) usable, "
                    r"SLURM_CPUS_PER_TASK=([^,\s]+), OMP_NUM_THREADS=([^,\s]+)(?:, Slurm node (\S+))?")


def placements(log: str) -> dict[int, dict]:
    """The per-rank placement lines of a run's log (``training.distributed.describe_place``), by rank."""
    out = {}
    for m in _PLACE.finditer(log):
        rank, world, local, host, cpus, slurm_cpus, omp, node = m.groups()
        out[int(rank)] = {"world": int(world), "local": int(local), "host": host, "cpus": int(cpus),
                          "slurm_cpus_per_task": slurm_cpus, "omp": omp, "node": node}  # fmt: skip
    return out
