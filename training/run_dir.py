"""One run per ``output_dir``: a new run never mixes with an old one, a resume has steps left.

A second run started into a directory that already holds a run would share its TensorBoard
curves, let ``save_total_limit`` delete the new run's newest checkpoint in favour of the old
ones, and make a later ``resume_from_checkpoint=auto`` pick the old run's last checkpoint. So,
before any process starts (``packlora launch``, ``packlora slurm``) and again in every training
process before the process group exists (``packlora train``)::

    output_dir holds checkpoint-N or packlora_config.yaml, no resume   -> refused (a new output_dir, or --overwrite)
    --overwrite                                                        -> the old run's files are deleted first
    resume from a checkpoint at step >= training.max_steps             -> refused, naming both numbers

``--overwrite`` deletes only what packlora writes into a run directory (``RUN_ENTRIES``); a
directory that also holds anything else is left alone, and the refusal lists those entries.
"""
from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

from packlora.core.checkpoint import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE_MODEL_DIR, DATA_ORDER, GENERATION_CONFIG,
                                      MODEL_CONFIG, RUN_CONFIG, TRAINER_STATE)
from packlora.core.errors import StateError

OVERWRITE_FLAG = "--overwrite"
CHECKED_ENV = "PACKLORA_RUN_DIR_CHECKED"
"""Set to ``1`` by ``packlora launch`` for the processes it starts: the launcher has checked (and,
with ``--overwrite``, cleared) ``output_dir`` already, so the processes do not check it again
(on a second node, the check could run before node 0's launcher cleared the directory)."""

RUN_ENTRIES = (
    "checkpoint-*", "tmp-checkpoint-*", BASE_MODEL_DIR, "runs", "slurm",
    RUN_CONFIG, DATA_ORDER, "data_report.json", "heldout.jsonl", "decoded.jsonl", "runaway_eval.jsonl", "batches.rank*.jsonl",
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, GENERATION_CONFIG, MODEL_CONFIG, "model*.safetensors",
    "model.safetensors.index.json", "training_args.bin", "README.md",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
"""Name patterns of everything a packlora run writes into its ``output_dir`` (``README.md`` is the
model card PEFT writes beside the adapter; ``slurm/`` the default ``packlora slurm --output``)."""


class RunDirError(StateError):
    """``output_dir`` holds another run, or the checkpoint to resume from has no steps left."""


def run_markers(output_dir: str | Path) -> list[str]:
    """The entries of ``output_dir`` that show a run was there: ``checkpoint-N`` / ``tmp-checkpoint-N``
    directories and ``packlora_config.yaml`` (written with the final adapter). Sorted; ``[]`` when
    the directory does not exist or holds none.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> (d / "checkpoint-15").mkdir(); (d / "runs").mkdir(); _ = (d / RUN_CONFIG).write_text("{}")
    >>> run_markers(d)
    ['checkpoint-15', 'packlora_config.yaml']
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.name == RUN_CONFIG or (p.is_dir() and fnmatch.fnmatch(p.name, "*checkpoint-*")))


def foreign_entries(output_dir: str | Path) -> list[str]:
    """Entries of ``output_dir`` that no packlora run writes (``RUN_ENTRIES``), sorted."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if not any(fnmatch.fnmatch(p.name, pat) for pat in RUN_ENTRIES))


def occupied_problem(output_dir: str | Path, where: str = "output_dir") -> str | None:
    """The refusal for a new run (no resume, no ``--overwrite``) into ``output_dir``, or None when
    it holds no run."""
    markers = run_markers(output_dir)
    if not markers:
        return None
    shown = ", ".join(markers[:4]) + (f" and {len(markers) - 4} more" if len(markers) > 4 else "")
    return (f"{where}: {output_dir} already holds a run ({shown}); a new run there would mix with it (two "
            f"TensorBoard curves over the same steps, save_total_limit deleting the new run's checkpoints, "
            f"resume_from_checkpoint=auto picking the old run's). Give a new output_dir (e.g. "
            f"output_dir={str(output_dir).rstrip('/')}-2 on the command line), or add {OVERWRITE_FLAG} to delete "
            f"the old run first; to continue that run instead, set training.resume_from_checkpoint=auto")


def clear_run(output_dir: str | Path) -> list[str]:
    """Delete the old run in ``output_dir`` (every entry matching ``RUN_ENTRIES``) and keep the
    directory. Returns the names deleted.

    Raises:
        RunDirError: the directory also holds entries no packlora run writes (listed); nothing is
            deleted then.
    """
    root = Path(output_dir)
    foreign = foreign_entries(root)
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise RunDirError(
            f"{OVERWRITE_FLAG}: {root} holds entries no packlora run writes ({shown}); not deleting anything there. "
            "Give a new output_dir, or move those entries away first"
        )
    if not root.is_dir():
        return []
    removed = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(p.name)
    return removed


def checkpoint_step(ckpt: str | Path) -> int | None:
    """``global_step`` of a checkpoint's ``trainer_state.json``, or None when it has none."""
    path = Path(ckpt) / TRAINER_STATE
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["global_step"])
    except (ValueError, KeyError, TypeError):
        return None


def finished_problem(ckpt: str | Path, max_steps: int, what: str = "training.max_steps is") -> str | None:
    """The refusal for resuming from ``ckpt`` when its step is at or past ``max_steps`` (> 0), or None."""
    step = checkpoint_step(ckpt)
    if step is None or max_steps <= 0 or step < max_steps:
        return None
    return (f"training.resume_from_checkpoint: {ckpt} is at step {step} and {what} {max_steps}: "
            f"nothing is left to train (a resume would run past the end of the schedule, at learning rate 0, and "
            f"overwrite the final adapter). Raise training.max_steps above {step} to train on, or start a new run "
            f"in a new output_dir")


def refuse_finished_resume(resume: str | None) -> list:
    """``[callback]`` that refuses, when training begins, a resume from ``resume`` whose step is at or
    past the schedule's last step (``state.max_steps``: also when the schedule is set in epochs, which
    only the Trainer turns into steps); ``[]`` without a resume. Raises ``RunDirError`` on every rank."""
    if resume is None:
        return []
    from transformers import TrainerCallback

    class _RefuseFinishedResume(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            problem = finished_problem(resume, state.max_steps, "the schedule ends at step")
            if problem:
                raise RunDirError(problem)

    return [_RefuseFinishedResume()]
