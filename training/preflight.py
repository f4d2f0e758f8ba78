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
import math
from pathlib import Path

from packlora.core.checkpoint import ADAPTER_CONFIG, MODEL_CONFIG, is_adapter, is_model
from packlora.core.config import ConfigError, check_value, config_source, mark_command_line, unknown_key
from packlora.core.errors import MissingPathError
from packlora.training.config import OWNED_TRAINING_KEYS, RunConfig, load_config


def check_run(cfg: RunConfig, training_arguments: bool = True) -> list[str]:
    """What the config needs from this machine, as problems naming their keys (empty: all there):
    model, tokenizer, data and ``init_from`` paths, the DeepSpeed config, the preset, the resume
    checkpoint, rows that fit the model's positions (``check_positions``), and
    (``training_arguments``, which imports transformers) that every ``training:`` key is a
    ``TrainingArguments`` field."""
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
    p += check_positions(cfg)
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


def check_positions(cfg: RunConfig) -> list[str]:
    """``data.max_seq_length`` against the positions the base model has (``position_limit``): a packed
    row, and an example as long as one, must not run past them. Empty when it fits, or when the
    model's config cannot be read here (a missing path is reported by ``check_run`` itself).

    Packed segments are never longer than a row and their positions restart at 0, so the row length
    bounds every position the model sees.
    """
    where, model_config = _base_model_config(cfg)
    if model_config is None:
        return []
    limit, how = position_limit(model_config)
    length = cfg.data.max_seq_length
    if limit is None or length <= limit:
        return []
    rope = ""
    if "rope_theta" in model_config or "rope_parameters" in model_config or "rope_scaling" in model_config:
        scaling = model_config.get("rope_scaling") or model_config.get("rope_parameters") or {}
        original = (scaling.get("original_max_position_embeddings") if isinstance(scaling, dict) else None) or (
            model_config.get("original_max_position_embeddings") or model_config["max_position_embeddings"])
        rope = (f", or give the model a rope scaling that reaches {length} tokens (e.g. rope_scaling: {{rope_type: "
                f"yarn, factor: {float(math.ceil(length / original))}, original_max_position_embeddings: {original}}} "
                "in its config)")
    return [f"data.max_seq_length: {length} tokens per row, but the model ({where}) has positions for {limit} "
            f"tokens ({how}); an example or packed row that long would run past the positions it was trained on. "
            f"Set data.max_seq_length <= {limit}{rope}"]


def position_limit(model_config: dict) -> tuple[int | None, str]:
    """``(tokens, how)``: how many positions a model config provides, and how that was read.

    ``max_position_embeddings``, or with a rope scaling (``rope_scaling``, or transformers 5's
    ``rope_parameters``, of a type other than ``default``) ``factor x original_max_position_embeddings``
    (the original from the scaling, else the config, else ``max_position_embeddings``) when that is
    larger: Qwen2.5's YaRN ``{factor: 4, original_max_position_embeddings: 32768}`` with
    ``max_position_embeddings: 32768`` reaches 131072; Llama-3.1's ``llama3`` scaling (factor 8 x 8192)
    keeps its ``max_position_embeddings: 131072``. (None, reason) when the config gives no limit.

    >>> position_limit({"max_position_embeddings": 2048})
    (2048, 'max_position_embeddings 2048')
    >>> position_limit({"max_position_embeddings": 32768,
    ...                 "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}})
    (131072, 'max_position_embeddings 32768; rope scaling yarn: factor 4.0 x 32768 = 131072')
    """
    key = "max_position_embeddings" if "max_position_embeddings" in model_config else "n_positions"
    max_pos = model_config.get(key)
    if not isinstance(max_pos, int) or isinstance(max_pos, bool):
        return None, "no max_position_embeddings"
    how = f"{key} {max_pos}"
    rope = model_config.get("rope_scaling") or model_config.get("rope_parameters")
    rope = rope if isinstance(rope, dict) else {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    factor = rope.get("factor") if kind != "default" else None
    if isinstance(factor, (int, float)) and not isinstance(factor, bool) and factor > 1:
        original = (rope.get("original_max_position_embeddings") or model_config.get("original_max_position_embeddings")
                    or max_pos)
        scaled = int(factor * original)
        how += f"; rope scaling {kind}: factor {factor} x {original} = {scaled}"
        return max(max_pos, scaled), how
    return max_pos, how


def _base_model_config(cfg: RunConfig) -> tuple[str, dict | None]:
    """``(where, config dict)`` of the base model the run trains: ``model.name_or_path``'s (or the
    stage-1 base of ``init_from``'s) ``config.json`` read as JSON (no model code runs), or
    ``model.config`` over its ``model_type``'s defaults. ``(where, None)`` when it cannot be read."""
    import json

    m = cfg.model
    if m.config is not None:
        spec = dict(m.config)
        if "max_position_embeddings" in spec or "n_positions" in spec:
            return "model.config", spec
        try:
            from transformers import AutoConfig

            defaults = AutoConfig.for_model(spec["model_type"]).to_dict()
        except (KeyError, ValueError):  # an unknown model_type: the build reports it
            return "model.config", None
        return f"model.config (model_type {spec['model_type']}'s default)", {**defaults, **spec}
    where, path = "model.name_or_path", m.name_or_path
    if path is None and cfg.init_from is not None:
        from packlora.training.init_from import stage1_base

        try:
            where, path = "the stage-1 base of init_from", stage1_base(cfg.init_from)
        except MissingPathError:
            return where, None
    if path is None or not (Path(path) / MODEL_CONFIG).is_file():
        return where, None
    try:
        raw = json.loads((Path(path) / MODEL_CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return where, None
    if "max_position_embeddings" not in raw and isinstance(raw.get("text_config"), dict):
        raw = raw["text_config"]  # a multimodal config: the language model's positions
    return f"{where} {path}", raw


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
