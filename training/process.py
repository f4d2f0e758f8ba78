"""What every training process sets up before the recipe runs: quiet library noise, one log format
with the rank in every line, and one line per rank saying where it runs."""
from __future__ import annotations

import logging
import os
import sys

from packlora.training import distributed

# Messages every run printed that say nothing about this run (transformers 5.24, torch 2.13,
# accelerate 1.15, DeepSpeed 0.19): deprecations inside the libraries, a C-compiler probe that
# DeepSpeed's op builder logs at INFO, and accelerate's "Gradient accumulation steps mismatch" (its
# own plugin says 1, DeepSpeed's config has training.gradient_accumulation_steps, and it takes
# DeepSpeed's, which is right; the batch arithmetic line states the value). PEFT's
# `is_gradient_checkpointing` warning is silenced where PEFT wraps a model (core/quiet.py).
NOISE = (r"`torch\.distributed\.\w+` is deprecated",
         r"'pin_memory' argument is set as true but no accelerator is found")


def quiet_known_noise() -> None:
    """Filter ``NOISE``; call before DeepSpeed is imported (``distributed.configure``)."""
    import warnings

    for message in NOISE:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("compilers.C.base").setLevel(logging.WARNING)
    logging.getLogger("accelerate.accelerator").addFilter(
        lambda record: "Gradient accumulation steps mismatch" not in record.getMessage())


def setup_logging() -> None:
    """INFO on rank 0, WARNING elsewhere, the rank in every line; call after ``distributed.configure``.
    Each rank's one data line (``packlora.data.prepare``: prepared, or loaded the cache) at INFO everywhere."""
    rank = distributed.rank()
    logging.getLogger("packlora.data.prepare").setLevel(logging.INFO)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )


def log_place() -> None:
    """Every rank, one line: where it runs and the CPUs it may use (a starved rank shows here)."""
    place = logging.getLogger("packlora.place")
    place.setLevel(logging.INFO)  # on every rank, not only rank 0
    place.info("%s", distributed.describe_place(os.environ))


def start_process() -> None:
    """Everything above, in order, plus ``distributed.configure`` (before ``TrainingArguments``
    initialises the process group; it sets ``RANK`` under srun)."""
    quiet_known_noise()
    distributed.configure()
    setup_logging()
    log_place()
