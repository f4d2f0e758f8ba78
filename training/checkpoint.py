"""Atomic checkpoints, rotation and resume. What a checkpoint holds is ``core/checkpoint.py``'s.

Checkpoints are atomic. ``PackloraTrainer`` writes everything of step N (adapter, DeepSpeed's
``global_stepN/`` shards from every rank, optimizer/scheduler/RNG state, trainer state, the extras
above) into ``output_dir/tmp-checkpoint-N``, waits for every rank, verifies the adapter, writes
``packlora_complete.json`` and only then renames the directory to ``checkpoint-N`` (one
``os.replace``, atomic on a POSIX file system). A crash before the rename leaves a
``tmp-checkpoint-N`` that nothing resumes from (and the next save of step N replaces); a
crash after it leaves a complete checkpoint. ``training.resume_from_checkpoint: auto`` picks the
newest ``checkpoint-N`` that holds the marker (``find_resume_checkpoint``), and rotation under
``save_total_limit`` only ever deletes older complete checkpoints (``rotate_checkpoints``). Each
checkpoint records what maps rows to steps (``data_order``); a resume under settings that would
re-train or skip rows is refused before training (``check_resume_settings``).
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from packlora.core.checkpoint import COMPLETE_MARKER, DATA_ORDER, TRAINER_STATE
from packlora.core.errors import InputError, MissingPathError

logger = logging.getLogger(__name__)
TMP_PREFIX = "tmp-checkpoint"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def is_complete(ckpt_dir: str | Path) -> bool:
    """True when ``ckpt_dir`` is a directory holding packlora's completion marker."""
    return (Path(ckpt_dir) / COMPLETE_MARKER).is_file()


def checkpoint_dirs(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` directory in ``output_dir``, oldest step first."""
    out = []
    root = Path(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            m = _CHECKPOINT_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def find_resume_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir``, or None when there is none.

    A ``checkpoint-N`` without the marker (a foreign or hand-made directory) and every
    ``tmp-checkpoint-N`` (a save cut short) are skipped with a warning.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> for n, done in ((2, True), (4, True), (6, False)):
    ...     (d / f"checkpoint-{n}").mkdir()
    ...     if done:
    ...         _ = (d / f"checkpoint-{n}" / COMPLETE_MARKER).write_text("{}")
    >>> (d / "tmp-checkpoint-8").mkdir()
    >>> find_resume_checkpoint(d).name
    'checkpoint-4'
    """
    for step, path in reversed(checkpoint_dirs(output_dir)):
        if is_complete(path):
            return path
        logger.warning("%s has no %s (not a complete packlora checkpoint); not resuming from it", path, COMPLETE_MARKER)
    return None


def resolve_resume(value, output_dir: str | Path) -> str | None:
    """``training.resume_from_checkpoint`` -> the checkpoint directory to resume from, or None.

    Args:
        value: None/False (start fresh), ``"auto"`` or True (the newest complete checkpoint in
            ``output_dir``; start fresh when there is none), or a checkpoint directory.
        output_dir: the run's output directory.

    Raises:
        FileNotFoundError: an explicit directory does not exist.
        ValueError: an explicit directory is not a complete checkpoint.
    """
    if value is None or value is False or value == "":
        return None
    if value is True or value == "auto":
        found = find_resume_checkpoint(output_dir)
        if found is None:
            logger.info("resume_from_checkpoint=auto: no complete checkpoint in %s; starting from step 0", output_dir)
            return None
        logger.info("resume_from_checkpoint=auto: resuming from %s", found)
        return str(found)
    path = Path(value)
    if not path.is_dir():
        raise MissingPathError(f"training.resume_from_checkpoint: {value!r} does not exist")
    if not (path / TRAINER_STATE).is_file() or (_CHECKPOINT_RE.match(path.name) and not is_complete(path)):
        raise InputError(
            f"training.resume_from_checkpoint: {path} is not a complete checkpoint (no trainer_state.json or "
            f"no {COMPLETE_MARKER}: its save was cut short); use an older checkpoint or resume_from_checkpoint=auto"
        )
    return str(path.resolve())


class ResumeMismatchError(InputError):
    """A resume whose settings map rows to steps differently from the checkpoint's: it would train
    rows twice or skip them (``check_resume_settings``)."""


# What decides which rows an optimizer step trains, as a resume compares it: key -> the setting to change.
DATA_ORDER_KEYS = {
    "world_size": "the number of training processes (world size)",
    "per_device_train_batch_size": "training.per_device_train_batch_size",
    "gradient_accumulation_steps": "training.gradient_accumulation_steps",
    "max_seq_length": "data.max_seq_length",
    "data_cache_key": "the data (sources, tokenizer, data: settings; the data cache key)",
    "seed": "seed",
}


def data_order(args, max_seq_length: int, data_cache_key: str, seed: int) -> dict:
    """What maps the run's rows to optimizer steps, as written to each checkpoint's
    ``packlora_data_order.json``: ``DATA_ORDER_KEYS`` and ``rows_per_step`` (= world size x
    micro-batch x accumulation).

    Rows are drawn in one seeded permutation (``seed``) of the packed rows (``max_seq_length``, the
    data cache key); every optimizer step takes the next ``rows_per_step`` of them, however they are
    split over processes, micro-batches and accumulation."""
    world, micro, accum = args.world_size, args.per_device_train_batch_size, args.gradient_accumulation_steps
    return {"world_size": world, "per_device_train_batch_size": micro, "gradient_accumulation_steps": accum,
            "rows_per_step": world * micro * accum, "max_seq_length": max_seq_length,
            "data_cache_key": data_cache_key, "seed": seed}


def check_resume_settings(ckpt: str | Path, current: dict) -> None:
    """Refuse a resume from ``ckpt`` that would not continue at the next unseen row.

    On resume the Trainer skips ``global_step x gradient_accumulation_steps`` micro-batches of the
    *new* settings (``Trainer._init_training_state``). That lands on the next unseen row exactly when
    the rows and their order are the same (``max_seq_length``, data cache key, ``seed``) and every
    step takes as many rows as before (``rows_per_step``): twice the processes with half the
    accumulation continues exactly, and is logged. Anything else would re-train rows or skip them
    (transformers #5605, #22143) and is refused. A checkpoint written before packlora recorded this
    (no ``packlora_data_order.json``) is resumed with a warning.

    Args:
        ckpt: the checkpoint to resume from.
        current: ``data_order(...)`` of this run.

    Raises:
        ResumeMismatchError: the settings that differ, both values of each, and the fix.
    """
    path = Path(ckpt) / DATA_ORDER
    if not path.is_file():
        logger.warning("%s has no %s (written by an older packlora): cannot check that this resume continues at "
                       "the next unseen row; keep the processes, batch size, accumulation and data as they were", ckpt,
                       DATA_ORDER)
        return
    saved = json.loads(path.read_text())
    differ = [k for k in DATA_ORDER_KEYS if saved.get(k) != current.get(k)]
    if not differ:
        return
    same_rows = not {"max_seq_length", "data_cache_key", "seed"} & set(differ)
    changes = "; ".join(f"{DATA_ORDER_KEYS[k]}: {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now"
                        for k in differ)
    if same_rows and saved.get("rows_per_step") == current["rows_per_step"]:
        logger.info("resuming %s with %s: every optimizer step still takes the next %d rows of the same order, so "
                    "training continues exactly at the next unseen row", ckpt, changes, current["rows_per_step"])
        return
    if same_rows:
        fix = (f"resume with the checkpoint's settings, or keep processes x per_device_train_batch_size x "
               f"gradient_accumulation_steps = {saved.get('rows_per_step')} rows per step (now "
               f"{current['world_size']} x {current['per_device_train_batch_size']} x "
               f"{current['gradient_accumulation_steps']} = {current['rows_per_step']})")
        why = ("every step now takes a different number of rows, so the Trainer's skip of global_step x "
               "gradient_accumulation_steps micro-batches would land on rows already trained or skip unseen ones")
    else:
        fix = "resume with the data, data.max_seq_length and seed the checkpoint was trained with"
        why = "the rows or their order changed, so the steps already taken cannot be mapped onto the new rows"
    raise ResumeMismatchError(
        f"training.resume_from_checkpoint: {ckpt} was trained with other settings ({changes}); {why}. Fix: {fix}; "
        "or train on from its adapter as a new run (init_from: <checkpoint>, init_mode: continue, a new output_dir)")


def commit_checkpoint(tmp_dir: str | Path, final_dir: str | Path, global_step: int) -> Path:
    """Mark ``tmp_dir`` complete and rename it to ``final_dir`` (the atomic step of a save).

    An existing ``final_dir`` (a run resumed from an older checkpoint reaches step N again) is
    moved aside first and deleted only after the rename, so a complete ``checkpoint-N`` exists at
    every moment.
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    (tmp_dir / COMPLETE_MARKER).write_text(json.dumps({"global_step": global_step}) + "\n")
    _fsync_dir(tmp_dir)
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f"{TMP_PREFIX}-replaced-{final_dir.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final_dir


def rotate_checkpoints(output_dir: str | Path, save_total_limit: int | None, keep: tuple[str | Path, ...] = ()) -> list[Path]:
    """Delete the oldest complete checkpoints until at most ``save_total_limit`` remain.

    The newest complete checkpoint and every path in ``keep`` (e.g. the best one) are never
    deleted; incomplete ``checkpoint-N`` directories are neither counted nor deleted.

    Returns:
        The deleted directories.
    """
    if not save_total_limit or save_total_limit <= 0:
        return []
    complete = [p for _, p in checkpoint_dirs(output_dir) if is_complete(p)]
    if not complete:
        return []
    protected = {complete[-1].resolve()} | {Path(k).resolve() for k in keep if k}
    deleted = []
    for p in complete:
        if len(complete) - len(deleted) <= save_total_limit:
            break
        if p.resolve() in protected:
            continue
        logger.info("save_total_limit=%d: deleting %s", save_total_limit, p)
        shutil.rmtree(p)
        deleted.append(p)
    return deleted


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
