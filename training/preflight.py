"""Preflight: what a valid config needs from this machine, checked before any work starts.

``training.config.load_config`` checks a config's shape without side effects; ``check_run`` then
looks at the file system and the libraries: model, tokenizer, data and ``init_from`` paths, the
DeepSpeed config, the preset, the resume checkpoint, and the ``training:`` keys and value types
against ``transformers.TrainingArguments``; ``run_dir_problems`` whether ``output_dir`` may take
this run (``training/run_dir.py``). ``load_and_check`` does these and raises one ``ConfigError``.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
from pathlib import Path

from packlora.core.checkpoint import ADAPTER_CONFIG, MODEL_CONFIG, is_adapter, is_model
from packlora.core.config import ConfigError, check_value, config_source, mark_command_line, unknown_key
from packlora.core.errors import MissingPathError
from packlora.training.config import OWNED_TRAINING_KEYS, RunConfig, load_config


def check_run(cfg: RunConfig, training_arguments: bool = True) -> list[str]:
    """What the config needs from this machine, as problems naming their keys (empty: all there):
    model, tokenizer, data and ``init_from`` paths, the DeepSpeed config, the preset, the resume
    checkpoint, and (``training_arguments``, which imports transformers) that every ``training:``
    key is a ``TrainingArguments`` field."""
    m, p = cfg.model, []
    for key, value in (("model.name_or_path", m.name_or_path), ("model.tokenizer", m.tokenizer)):
        if value is not None and not Path(value).exists():
            p.append(f"{key}: {value!r} does not exist (paths are relative to the working directory {Path.cwd()})")
    p += cfg.data.missing_files()
    if cfg.deepspeed:
        try:
            resolve_deepspeed_config(cfg.deepspeed)
        except FileNotFoundError as e:
            p.append(str(e))
    if cfg.preset is not None:
        from packlora.presets import PresetError, load_preset

        try:
            load_preset(str(cfg.preset))
        except PresetError as e:
            p.append(f"preset: {e}")
    p += _check_init_from(cfg)
    resume = cfg.training.get("resume_from_checkpoint")
    if resume not in (None, "auto", True, False) and (not isinstance(resume, str) or not Path(resume).is_dir()):
        p.append(f"training.resume_from_checkpoint: {resume!r} is not a checkpoint directory; give an existing "
                 f"output_dir/checkpoint-N (relative to {Path.cwd()}), auto (the newest complete one), or null")
    if training_arguments:
        p += training_key_problems(cfg.training)
    return p


def training_key_problems(training: dict) -> list[str]:
    """Every ``training:`` key that is not a ``transformers.TrainingArguments`` field (with a "did you
    mean"), and every value whose type does not match the field's annotation (``core.config.check_value``:
    ``training.learning_rate: abc`` is refused here, not in every rank). Imports transformers."""
    import typing

    from transformers import TrainingArguments

    fields = {f.name: f for f in dataclasses.fields(TrainingArguments)}
    hints = typing.get_type_hints(TrainingArguments)
    p = []
    for k, v in training.items():
        if k in OWNED_TRAINING_KEYS:
            continue
        if k not in fields:
            p.append(unknown_key(f"training.{k}", fields).replace("unknown key", "not a transformers.TrainingArguments field"))
            continue
        problem = check_value(v, hints[k], f"training.{k}")
        if problem:
            p.append(problem)
    return p


def run_dir_problems(cfg: RunConfig, overwrite: bool = False) -> list[str]:
    """``output_dir`` against the run about to start (``training/run_dir.py``): a new run into a
    directory holding another is refused unless ``overwrite``; ``overwrite`` with a resume is refused
    (it would delete what the resume reads); a resume from a checkpoint at or past
    ``training.max_steps`` is refused with both numbers."""
    from packlora.training.checkpoint import find_resume_checkpoint
    from packlora.training.run_dir import OVERWRITE_FLAG, finished_problem, foreign_entries, occupied_problem, run_markers

    resume = cfg.training.get("resume_from_checkpoint")
    if resume in (None, False, ""):
        if not overwrite:
            problem = occupied_problem(cfg.output_dir)
            return [problem] if problem else []
        foreign = foreign_entries(cfg.output_dir) if run_markers(cfg.output_dir) else []
        return [f"output_dir: {OVERWRITE_FLAG} would delete the run in {cfg.output_dir}, but it also holds entries no "
                f"packlora run writes ({', '.join(foreign[:6])}); give a new output_dir, or move them away"] if foreign else []
    if overwrite:
        return [f"training.resume_from_checkpoint: {resume!r} with {OVERWRITE_FLAG}, which deletes the run it would "
                f"resume; drop one of them"]
    ckpt = find_resume_checkpoint(cfg.output_dir) if resume in (True, "auto") else Path(resume)
    max_steps = cfg.training.get("max_steps", -1)
    if ckpt is None or not isinstance(max_steps, int) or isinstance(max_steps, bool):
        return []
    problem = finished_problem(ckpt, max_steps)
    return [problem] if problem else []


def _check_init_from(cfg: RunConfig) -> list[str]:
    if cfg.init_from is None:
        return []
    ckpt = Path(cfg.init_from)
    if not (is_adapter(ckpt) or is_model(ckpt)):
        return [f"init_from: {cfg.init_from!r} is not a checkpoint directory (no {ADAPTER_CONFIG} or {MODEL_CONFIG}); "
                f"point it at the stage-1 output_dir (paths are relative to {Path.cwd()})"]
    if cfg.init_mode == "continue" and not is_adapter(ckpt):
        return [f"init_mode: continue needs a LoRA checkpoint, but {cfg.init_from!r} is a full model; use merge"]
    return []


def load_and_check(path: str | Path, overrides=(), training_arguments: bool = True, run_dir: bool = False,
                   overwrite: bool = False) -> RunConfig:
    """``load_config`` then ``check_run`` (and, with ``run_dir``, ``run_dir_problems(cfg, overwrite)``);
    raises one ``ConfigError`` with every problem, those with a key set by an override marked
    "(set on the command line)"."""
    cfg = load_config(path, overrides)
    problems = check_run(cfg, training_arguments) + (run_dir_problems(cfg, overwrite) if run_dir else [])
    if problems:
        raise ConfigError(mark_command_line(problems, overrides), config_source(path, overrides))
    return cfg


def advice(cfg: RunConfig) -> list[str]:
    """Settings that are valid but almost certainly not meant (logged as warnings, never refused)."""
    t = cfg.training
    out = []
    max_steps, warmup = t.get("max_steps", -1), t.get("warmup_steps", 0)
    if isinstance(max_steps, int) and max_steps > 0 and isinstance(warmup, int) and warmup >= max_steps:
        out.append(f"training.warmup_steps={warmup} >= training.max_steps={max_steps}: the learning rate never "
                   "leaves warm-up, so the loss barely moves; lower warmup_steps (e.g. to a tenth of max_steps)")
    return out


def resolve_deepspeed_config(name: str) -> str:
    """``zero3.json`` -> the packaged ``ds_configs/zero3.json``; an existing path is returned as is.

    Raises:
        FileNotFoundError: neither a path nor a packaged config.
    """
    if Path(name).is_file():
        return str(Path(name).resolve())
    packaged = importlib.resources.files("packlora.ds_configs") / name
    if packaged.is_file():
        return str(packaged)
    available = sorted(p.name for p in importlib.resources.files("packlora.ds_configs").iterdir() if p.name.endswith(".json"))
    raise MissingPathError(f"deepspeed: {name!r} is neither a file nor one of ds_configs/ {available}")


def deepspeed_path(cfg: RunConfig) -> str | None:
    """The run's DeepSpeed JSON (``resolve_deepspeed_config``), or None without DeepSpeed."""
    return resolve_deepspeed_config(cfg.deepspeed) if cfg.deepspeed else None
