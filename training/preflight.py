"""Preflight: what a valid config needs from this machine, checked before any work starts.

``training.config.load_config`` checks a config's shape without side effects; ``check_run`` then
looks at the file system and the libraries: model, tokenizer, data and ``init_from`` paths, the
DeepSpeed config, the preset, the resume checkpoint, and the ``training:`` keys against
``transformers.TrainingArguments``. ``load_and_check`` does both and raises one ``ConfigError``.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
from pathlib import Path

from packlora.core.checkpoint import ADAPTER_CONFIG, MODEL_CONFIG, is_adapter, is_model
from packlora.core.config import ConfigError, unknown_key
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
            p += _check_loraplus(cfg, resolve_deepspeed_config(cfg.deepspeed))
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
        from transformers import TrainingArguments

        valid = [f.name for f in dataclasses.fields(TrainingArguments)]
        p += [unknown_key(f"training.{k}", valid).replace("unknown key", "not a transformers.TrainingArguments field")
              for k in cfg.training if k not in valid and k not in OWNED_TRAINING_KEYS]
    return p


def _check_loraplus(cfg: RunConfig, ds_json: str) -> list[str]:
    """LoRA+ needs the Trainer to build the optimizer and scheduler: a DeepSpeed JSON with its own
    ``optimizer`` would ignore it, one with its own ``scheduler`` would set every group to one rate."""
    import json

    if cfg.lora is None or cfg.lora.loraplus_lr_ratio is None:
        return []
    try:
        sections = [k for k in ("optimizer", "scheduler") if k in json.loads(Path(ds_json).read_text())]
    except (OSError, ValueError) as e:
        return [f"deepspeed: cannot read {ds_json} ({e})"]
    return [f"lora.loraplus_lr_ratio: {ds_json} has its own '{k}' section, which would "
            + ("ignore LoRA+'s optimizer" if k == "optimizer" else "give every parameter group one learning rate")
            + f"; remove '{k}' from it (the Trainer then builds it from training:) or drop loraplus_lr_ratio"
            for k in sections]


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


def load_and_check(path: str | Path, overrides=(), training_arguments: bool = True) -> RunConfig:
    """``load_config`` then ``check_run``; raises one ``ConfigError`` with every problem."""
    cfg = load_config(path, overrides)
    problems = check_run(cfg, training_arguments)
    if problems:
        raise ConfigError(problems, str(path))
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
