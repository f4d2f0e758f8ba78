"""Stop cleanly when asked: a complete checkpoint at the next step boundary, then exit 75.

Who asks: Slurm warns a batch job before its time limit (``#SBATCH --signal=B:USR1@SECONDS``, written
by ``packlora slurm``); the batch script traps that USR1 and creates the file named by
``PACKLORA_STOP_FILE``. Any process may also get ``SIGUSR1`` itself (``kill -USR1 PID``,
``scancel --signal=USR1`` with ``--launcher srun``). The file works whatever launcher sits in
between (torchrun and deepspeed die of a USR1 sent to them), and only rank 0 has to see it: it sits
on the node the batch script runs on.

How every rank stops at the same step (``training.trainer.StopOnRequestCallback``): after each
optimizer step, every rank all-reduces (max) one integer, "a stop was requested here", so all ranks
agree, set ``should_save`` and ``should_training_stop``, and the Trainer writes ``checkpoint-N``
(atomic, with its completion marker, ``training.checkpoint``) before leaving the loop. Rank 0 then writes
``$PACKLORA_STOP_FILE.checkpoint`` (``{"global_step": N, "checkpoint": ...}``), which tells the
batch script that the stop was clean, and every process exits with ``STOPPED_EXIT_CODE``.

    PACKLORA_STOP_FILE=/tmp/stop packlora launch run.yaml &   # later: touch /tmp/stop

This module stays light (no torch, no transformers): ``launcher.slurm`` reads its constants.
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

STOP_FILE_ENV = "PACKLORA_STOP_FILE"
"""Environment variable naming the stop-request file (polled by rank 0 after every optimizer step)."""
STOPPED_EXIT_CODE = 75
"""Exit code of a run stopped on request after saving a complete checkpoint: ``EX_TEMPFAIL`` of
``sysexits.h`` ("temporary failure; the user is invited to retry"). deepspeed and srun pass it on;
torchrun turns every non-zero exit of a worker into its own exit code 1."""
ACK_SUFFIX = ".checkpoint"
"""Rank 0 writes ``<stop file>.checkpoint`` once the checkpoint of the stop step is complete."""


def ack_path(stop_file: str | os.PathLike) -> Path:
    """Where rank 0 acknowledges a clean stop: ``<stop file>.checkpoint``.

    >>> str(ack_path("/runs/x/slurm/stop-42"))
    '/runs/x/slurm/stop-42.checkpoint'
    """
    return Path(str(stop_file) + ACK_SUFFIX)


class StopRequest:
    """Whether this process was asked to stop: ``SIGUSR1`` received, or (rank 0) ``stop_file`` exists.
    ``training.trainer.StopOnRequestCallback`` asks it after every optimizer step.

    Args:
        stop_file: the request file (``PACKLORA_STOP_FILE``), or None for the signal only.
        rank: this process's global rank; only rank 0 polls the file.
    """

    def __init__(self, stop_file: str | None, rank: int):
        self.stop_file, self.rank = stop_file, rank
        self._signalled = False
        self._previous = None

    def install(self) -> None:
        """Catch SIGUSR1 from now on (main thread only, as ``signal.signal`` requires)."""
        self._previous = signal.signal(signal.SIGUSR1, self._on_signal)

    def uninstall(self) -> None:
        """Give SIGUSR1 back to the handler it had before ``install``."""
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, self._previous)
            self._previous = None

    def _on_signal(self, signum, frame) -> None:
        self._signalled = True  # acted on at the next step boundary, never inside a step

    def reason(self) -> str:
        """Why this process wants to stop, e.g. ``"SIGUSR1"``; ``""`` when it does not."""
        if self._signalled:
            return "SIGUSR1"
        if self.rank == 0 and self.stop_file and os.path.exists(self.stop_file):
            return f"stop file {self.stop_file}"
        return ""


def acknowledge(stop_file: str | None, checkpoint: Path, global_step: int) -> None:
    """Rank 0, after ``checkpoint`` is complete: write ``ack_path(stop_file)`` (no-op without a file)."""
    if not stop_file:
        return
    ack = ack_path(stop_file)
    tmp = ack.with_name(ack.name + ".tmp")
    tmp.write_text(json.dumps({"global_step": global_step, "checkpoint": str(checkpoint)}) + "\n")
    os.replace(tmp, ack)  # the batch script never reads a half-written file
