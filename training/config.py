"""Run configuration: one YAML file per run, ``key.sub=value`` overrides, validated once.

Example (``configs/shishuo_tiny.yaml`` is the bundled default)::

    output_dir: runs/shishuo-tiny
    seed: 42
    deepspeed: zero3.json            # a file in ds_configs/ or a path; null for no DeepSpeed
    model:
      config: {model_type: qwen2, hidden_size: 128, num_hidden_layers: 4, ...}   # random init
      tokenizer: ../shared/assets/qwen2-tokenizer
      attn_implementation: sdpa
    lora: {r: 16, alpha: 32, target_modules: [q_proj, k_proj, v_proj, o_proj]}
    data:
      train: [../shared/data/shishuo/stage2_rewrite.jsonl]
      max_seq_length: 1024
    training: {max_steps: 30, learning_rate: 2.0e-4, per_device_train_batch_size: 1}
    decoding: {stop_tokens: ["<|im_end|>", "<|endoftext|>"], max_new_tokens: 512}

    $ packlora inspect configs/shishuo_tiny.yaml training.max_steps=5 data.max_seq_length=512

Every problem in a config is collected and reported at once, each naming its key. Unknown keys
are errors. Relative paths are resolved against the current working directory.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ATTN_IMPLEMENTATIONS = ("sdpa", "packed_sdpa", "varlen", "eager", "flash_attention_2", "flex_attention")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OVERFLOW_POLICIES = ("auto", "drop", "error", "split")
DATA_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "text")
ON_ERROR_POLICIES = ("error", "skip")
DATA_STAGES = ("auto", "pretrain", "sft")
TEXT_EOS = ("document", "chunk")
INIT_MODES = ("merge", "continue")
LABEL_MODES = ("assistant_only", "legacy_full_sequence")
# TrainingArguments keys that packlora sets itself, and where the user sets them instead.
OWNED_TRAINING_KEYS = {
    "output_dir": "output_dir",
    "deepspeed": "deepspeed",
    "seed": "seed",
    "data_seed": "seed",
    "bf16": "model.dtype",
    "fp16": "model.dtype",
    "remove_unused_columns": "(packlora needs seq_lens kept)",
}


class ConfigError(ValueError):
    """One or more config problems; ``problems`` lists them, each starting with its key."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in {source}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(kw_only=True)
class ModelConfig:
    """Base model and tokenizer."""

    name_or_path: str | None = None
    """A Hugging Face model directory. Exactly one of ``name_or_path`` / ``config`` is set."""
    config: dict | None = None
    """A model config dict (needs ``model_type``) to build a randomly initialised base from;
    ``vocab_size`` defaults to the tokenizer's length. The base is saved to ``output_dir/base_model``."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to ``name_or_path``."""
    attn_implementation: str = "sdpa"
    """``sdpa`` (block-diagonal mask from the restarting positions), ``packed_sdpa`` (SDPA per
    segment, no mask: faster, see training/packed_attention.py), ``varlen`` (GPU: PyTorch's own
    Flash Attention varlen kernel on the flattened batch, bf16/fp16, nothing to install; see
    training/varlen_attention.py), ``eager``, ``flash_attention_2`` (GPU, the flash-attn package) or
    ``flex_attention`` (GPU for training: torch has no flex backward on CPU)."""
    dtype: str = "auto"
    """Weights and compute dtype. ``auto``: bfloat16 on CUDA, float32 on CPU."""
    trust_remote_code: bool = False
    """Run code shipped with the model. Off unless you trust the model's source."""


@dataclass(kw_only=True)
class LoraConfig:
    """PEFT LoRA hyper-parameters (``peft.LoraConfig``)."""

    r: int = 16
    """Rank of the update matrices."""
    alpha: float = 32
    """Scaling numerator: the update is scaled by ``alpha / r``."""
    dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names to adapt (Qwen2/Llama projection names by default)."""


@dataclass(kw_only=True)
class DataConfig:
    """Input data, tokenisation and packing."""

    train: list[str] = field(default_factory=list)
    """JSONL file(s) to train on."""
    format: str = "auto"
    """``messages``, ``sharegpt``, ``alpaca``, ``text`` or ``auto`` (per line, from its keys)."""
    max_seq_length: int = 2048
    """Tokens per packed row."""
    overflow: str = "auto"
    """What to do with an example longer than ``max_seq_length``: ``drop`` (counted), ``error``, or
    ``split`` (raw text only). ``auto``: ``drop`` for chats, ``split`` for text."""
    eval_holdout: int = 0
    """Records held out of training (drawn with ``seed``) and decoded after training."""
    cache_dir: str | None = None
    """Where tokenised/packed datasets are cached; default ``~/.cache/packlora/datasets``."""
    on_error: str = "error"
    """A bad line (invalid JSON or UTF-8, missing field, unknown role...) or a duplicate record:
    ``error`` stops before training, naming file, line and field; ``skip`` leaves it out and
    counts it by reason in ``output_dir/data_report.json``."""
    packing: bool = True
    """Pack examples into rows of ``max_seq_length`` (best-fit-decreasing). ``false``: one example
    per row, padded per batch (a baseline; the same labels and loss)."""
    stage: str = "auto"
    """``pretrain`` (stage 1: ``{"text"}`` records only, every token trained, long documents split
    into counted chunks of at most ``max_seq_length``), ``sft`` (chats only, assistant-only labels),
    or ``auto`` (each record by its kind). A record of the wrong kind is an error naming its line."""
    text_eos: str = "document"
    """Where EOS goes in raw text: ``document`` (only at the true end of a document, so only the last
    chunk of a split document ends with EOS) or ``chunk`` (every chunk ends with EOS)."""
    labels: str = "assistant_only"
    """``assistant_only`` (the default and the only sound choice): train assistant replies and their
    ``<|im_end|>``, each packed segment isolated. ``legacy_full_sequence`` reproduces the runaway
    bug on purpose, never use it for a real model: labels cover the whole ChatML text, role
    markers included, and segments are packed WITHOUT isolation (positions run on, first labels
    trained). The label audit then only warns. See docs/behaviour-boundary.md."""


@dataclass(kw_only=True)
class DecodingConfig:
    """Stop handling written into every checkpoint's ``generation_config.json``."""

    stop_tokens: list[str] = field(default_factory=lambda: ["<|im_end|>", "<|endoftext|>"])
    """Tokens that end generation; their ids become ``generation_config.eos_token_id``."""
    max_new_tokens: int = 512
    """Generation length limit, in tokens."""


@dataclass(kw_only=True)
class RunawayEvalConfig:
    """Runaway metrics on held-out prompts during training (``training/runaway_callback.py``)."""

    every_steps: int = 0
    """Run every this many optimizer steps, logged to TensorBoard as ``runaway/*``; 0 = off.
    Needs ``data.eval_holdout`` >= 1 (the prompts are the held-out chats)."""
    num_prompts: int = 4
    """Held-out prompts decoded each time (the first ``num_prompts`` of the hold-out)."""
    max_new_tokens: int = 64
    """Tokens generated per prompt before a reply counts as ``hit_max_new_tokens``."""


@dataclass(kw_only=True)
class RunConfig:
    """A whole run. ``training`` is passed to ``transformers.TrainingArguments`` as is."""

    output_dir: str
    """Checkpoints, TensorBoard logs (``output_dir/runs``), reports and the resolved config."""
    seed: int = 42
    """Seeds data order, LoRA init, hold-out draw and a config-built base model."""
    deepspeed: str | None = "zero3.json"
    """A file in ``ds_configs/`` (``zero2.json``, ``zero3.json``) or a path; null disables DeepSpeed."""
    log_batch_digests: bool = False
    """Debug: each rank appends a digest of every batch it trains on to ``output_dir/batches.rank{R}.jsonl``."""
    preset: str | None = None
    """A style preset (``presets/``: ``zhang_henshui``, ``shishuo``, ``none``, or a YAML path): its
    system prompt + guard sentence go into every chat that lacks a system message, and its stop
    tokens join ``decoding.stop_tokens``."""
    preset_overrides_system: bool = False
    """Let the preset replace a system message the record already has (default: keep the record's)."""
    init_from: str | None = None
    """Stage 2 from stage 1: a packlora checkpoint directory to start from (see ``init_mode``)."""
    init_mode: str = "merge"
    """``merge``: merge ``init_from``'s adapter into its base, save that as ``output_dir/base_model``
    and train a fresh LoRA on it. ``continue``: keep training ``init_from``'s adapter (same base)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    loss_normalization: str = "per_token"
    """``per_token``: every trained token weighs the same over the whole optimizer step (all
    accumulation steps and ranks). ``per_example``: every example weighs the same whatever its
    length. Formulas in ``training/loss.py``."""
    lora: LoraConfig | None = field(default_factory=LoraConfig)
    """LoRA settings; ``lora: null`` trains every parameter of the base (full fine-tuning)."""
    data: DataConfig = field(default_factory=DataConfig)
    training: dict = field(default_factory=dict)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    runaway_eval: RunawayEvalConfig = field(default_factory=RunawayEvalConfig)

    def deepspeed_path(self) -> str | None:
        """The DeepSpeed JSON to use, resolved against ``ds_configs/`` for bare names."""
        return resolve_deepspeed_config(self.deepspeed) if self.deepspeed else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {
    "model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "decoding": DecodingConfig,
    "runaway_eval": RunawayEvalConfig,
}
_NULLABLE_SECTIONS = ("lora",)  # `lora: null` = full-parameter training


def resolve_deepspeed_config(name: str) -> str:
    """``zero3.json`` -> the packaged ``ds_configs/zero3.json``; an existing path is returned as is.

    Raises:
        FileNotFoundError: neither a path nor a packaged config.
    """
    if Path(name).is_file():
        return str(Path(name).resolve())
    packaged = importlib.resources.files("ds_configs") / name
    if packaged.is_file():
        return str(packaged)
    available = sorted(p.name for p in importlib.resources.files("ds_configs").iterdir() if p.name.endswith(".json"))
    raise FileNotFoundError(f"deepspeed: {name!r} is neither a file nor one of ds_configs/ {available}")


def parse_overrides(overrides: list[str]) -> dict:
    """``["training.max_steps=5", "lora.target_modules=[q_proj]"]`` -> nested dict.

    Values are parsed with ``yaml.safe_load`` (so ``5`` is an int, ``[a, b]`` a list, ``null`` None).

    >>> parse_overrides(["training.max_steps=5", "data.train=[a.jsonl]"])
    {'training': {'max_steps': 5}, 'data': {'train': ['a.jsonl']}}

    Raises:
        ConfigError: an item is not ``key=value``.
    """
    out: dict = {}
    bad = []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            bad.append(f"override {item!r} is not of the form key.sub=value")
            continue
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                bad.append(f"override {item!r} conflicts with an earlier override of {part}")
                break
        else:
            node[parts[-1]] = yaml.safe_load(value) if value else ""
    if bad:
        raise ConfigError(bad, "command-line overrides")
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read a YAML run config with ``yaml.safe_load``, apply overrides, validate everything once.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: all problems found, each naming its key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ConfigError([f"top level must be a mapping, got {type(raw).__name__}"], str(path))
    return config_from_dict(_merge(raw, parse_overrides(list(overrides))), source=str(path))


def config_from_dict(raw: dict, source: str = "config") -> RunConfig:
    """Build and validate a ``RunConfig`` from a plain dict (see ``load_config``)."""
    problems: list[str] = []
    top_fields = {f.name for f in dataclasses.fields(RunConfig)}
    for key in raw:
        if key not in top_fields:
            problems.append(f"{key}: unknown key; valid top-level keys are {sorted(top_fields)}")
    kwargs: dict[str, Any] = {}
    for name, cls in _SECTIONS.items():
        if name in _NULLABLE_SECTIONS and name in raw and raw[name] is None:
            kwargs[name] = None
            continue
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            problems.append(f"{name}: must be a mapping, got {type(section).__name__}")
            continue
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in section if k not in valid]
        problems += [f"{name}.{k}: unknown key; valid keys are {sorted(valid)}" for k in unknown]
        kwargs[name] = cls(**{k: v for k, v in section.items() if k in valid})
    for key in top_fields - set(_SECTIONS):  # plain top-level values (output_dir, seed, training, ...)
        if key in raw:
            kwargs[key] = raw[key]
    if "output_dir" not in kwargs:
        problems.append("output_dir: required (where checkpoints and logs go)")
        kwargs["output_dir"] = ""
    cfg = RunConfig(**kwargs)
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def validate(cfg: RunConfig) -> list[str]:
    """Every problem in ``cfg``, each starting with the key at fault (empty list = valid)."""
    p: list[str] = []
    m, lo, d, dec = cfg.model, cfg.lora, cfg.data, cfg.decoding
    if not isinstance(cfg.seed, int):
        p.append(f"seed: must be an integer, got {cfg.seed!r}")
    if cfg.loss_normalization not in ("per_token", "per_example"):
        p.append(f"loss_normalization: {cfg.loss_normalization!r} is not one of ['per_token', 'per_example']")
    if not isinstance(cfg.data.packing, bool):
        p.append(f"data.packing: must be true or false, got {cfg.data.packing!r}")
    if (m.name_or_path is None) == (m.config is None):
        p.append("model.name_or_path / model.config: set exactly one (a model directory, or a config to build from)")
    if m.config is not None and (not isinstance(m.config, dict) or "model_type" not in m.config):
        p.append("model.config: must be a mapping with a model_type (e.g. qwen2)")
    if m.name_or_path is None and m.tokenizer is None:
        p.append("model.tokenizer: required when the model is built from model.config")
    for key, value in (("model.name_or_path", m.name_or_path), ("model.tokenizer", m.tokenizer)):
        if value is not None and not Path(value).exists():
            p.append(f"{key}: {value!r} does not exist (paths are relative to the working directory {Path.cwd()})")
    if m.attn_implementation not in ATTN_IMPLEMENTATIONS:
        p.append(f"model.attn_implementation: {m.attn_implementation!r} is not one of {list(ATTN_IMPLEMENTATIONS)}")
    if m.dtype not in DTYPES:
        p.append(f"model.dtype: {m.dtype!r} is not one of {list(DTYPES)}")
    if m.attn_implementation in ("varlen", "flash_attention_2") and m.dtype == "float32":
        p.append(f"model.dtype: float32 with model.attn_implementation: {m.attn_implementation}; Flash Attention takes "
                 "bfloat16 or float16 only: set model.dtype: bfloat16 (or auto, bf16 on CUDA)")
    if m.attn_implementation in ("varlen", "flash_attention_2") and d.labels == "legacy_full_sequence":
        p.append(f"data.labels: legacy_full_sequence cannot run with model.attn_implementation: "
                 f"{m.attn_implementation}, which isolates segments by construction; use sdpa or eager")
    if lo is not None and (not isinstance(lo.r, int) or lo.r < 1):
        p.append(f"lora.r: must be an integer >= 1, got {lo.r!r}")
    if lo is not None and (not isinstance(lo.alpha, (int, float)) or lo.alpha <= 0):
        p.append(f"lora.alpha: must be > 0, got {lo.alpha!r}")
    if lo is not None and (not isinstance(lo.dropout, (int, float)) or not 0 <= lo.dropout < 1):
        p.append(f"lora.dropout: must be in [0, 1), got {lo.dropout!r}")
    if lo is not None and (not isinstance(lo.target_modules, list) or not lo.target_modules):
        p.append(f"lora.target_modules: must be a non-empty list of module names, got {lo.target_modules!r}")
    if isinstance(d.train, str):
        d.train = [d.train]
    if not d.train:
        p.append("data.train: give at least one JSONL file")
    for f in d.train or []:
        if not Path(f).is_file():
            p.append(f"data.train: file {f!r} does not exist (paths are relative to {Path.cwd()})")
    if d.format not in DATA_FORMATS:
        p.append(f"data.format: {d.format!r} is not one of {list(DATA_FORMATS)}")
    if not isinstance(d.max_seq_length, int) or d.max_seq_length < 8:
        p.append(f"data.max_seq_length: must be an integer >= 8 (tokens), got {d.max_seq_length!r}")
    if d.overflow not in OVERFLOW_POLICIES:
        p.append(f"data.overflow: {d.overflow!r} is not one of {list(OVERFLOW_POLICIES)}")
    if not isinstance(d.eval_holdout, int) or d.eval_holdout < 0:
        p.append(f"data.eval_holdout: must be an integer >= 0 (records), got {d.eval_holdout!r}")
    if d.on_error not in ON_ERROR_POLICIES:
        p.append(f"data.on_error: {d.on_error!r} is not one of {list(ON_ERROR_POLICIES)}")
    if d.labels not in LABEL_MODES:
        p.append(f"data.labels: {d.labels!r} is not one of {list(LABEL_MODES)} (assistant_only is the sound default)")
    ra = cfg.runaway_eval
    for key in ("every_steps", "num_prompts", "max_new_tokens"):
        value, least = getattr(ra, key), 0 if key == "every_steps" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            p.append(f"runaway_eval.{key}: must be an integer >= {least}, got {value!r}")
    if isinstance(ra.every_steps, int) and ra.every_steps > 0 and isinstance(d.eval_holdout, int) and d.eval_holdout < 1:
        p.append("runaway_eval.every_steps: needs held-out prompts; set data.eval_holdout >= 1 or every_steps: 0")
    p += _validate_two_stage(cfg)
    if not isinstance(dec.stop_tokens, list) or not all(isinstance(s, str) for s in dec.stop_tokens):
        p.append(f"decoding.stop_tokens: must be a list of token strings, got {dec.stop_tokens!r}")
    if not isinstance(dec.max_new_tokens, int) or dec.max_new_tokens < 1:
        p.append(f"decoding.max_new_tokens: must be an integer >= 1, got {dec.max_new_tokens!r}")
    if cfg.deepspeed:
        try:
            resolve_deepspeed_config(cfg.deepspeed)
        except FileNotFoundError as e:
            p.append(str(e))
    if not isinstance(cfg.training, dict):
        p.append(f"training: must be a mapping of TrainingArguments fields, got {type(cfg.training).__name__}")
    else:
        p += _validate_training(cfg.training)
    return p


def _validate_two_stage(cfg: RunConfig) -> list[str]:
    """Problems with ``data.stage``, ``data.text_eos``, ``preset*`` and ``init_from``/``init_mode``."""
    p = []
    if cfg.data.stage not in DATA_STAGES:
        p.append(f"data.stage: {cfg.data.stage!r} is not one of {list(DATA_STAGES)}")
    if cfg.data.text_eos not in TEXT_EOS:
        p.append(f"data.text_eos: {cfg.data.text_eos!r} is not one of {list(TEXT_EOS)}")
    if cfg.data.stage == "sft" and cfg.data.overflow == "split":
        p.append("data.overflow: split would cut chats mid-answer under data.stage=sft; use drop or error")
    if cfg.preset is not None:
        from presets import PresetError, load_preset

        try:
            load_preset(str(cfg.preset))
        except PresetError as e:
            p.append(f"preset: {e}")
    if not isinstance(cfg.preset_overrides_system, bool):
        p.append(f"preset_overrides_system: must be true or false, got {cfg.preset_overrides_system!r}")
    if cfg.init_mode not in INIT_MODES:
        p.append(f"init_mode: {cfg.init_mode!r} is not one of {list(INIT_MODES)}")
    if cfg.init_from is not None:
        ckpt = Path(str(cfg.init_from))
        if not ((ckpt / "adapter_config.json").is_file() or (ckpt / "config.json").is_file()):
            p.append(
                f"init_from: {cfg.init_from!r} is not a checkpoint directory (no adapter_config.json or "
                f"config.json); point it at the stage-1 output_dir (paths are relative to {Path.cwd()})"
            )
        elif cfg.init_mode == "continue" and not (ckpt / "adapter_config.json").is_file():
            p.append(f"init_mode: continue needs a LoRA checkpoint, but {cfg.init_from!r} is a full model; use merge")
        if cfg.init_mode == "continue" and cfg.lora is None:
            p.append("init_mode: continue keeps training a LoRA adapter; it cannot be combined with lora: null")
    return p


def _validate_training(training: dict) -> list[str]:
    from transformers import TrainingArguments

    valid = {f.name for f in dataclasses.fields(TrainingArguments)}
    p = []
    for key in training:
        if key in OWNED_TRAINING_KEYS:
            p.append(f"training.{key}: set by packlora; use {OWNED_TRAINING_KEYS[key]} instead")
        elif key not in valid:
            p.append(f"training.{key}: not a transformers.TrainingArguments field")
    resume = training.get("resume_from_checkpoint")
    if resume not in (None, "auto") and (not isinstance(resume, str) or not Path(resume).is_dir()):
        p.append(
            f"training.resume_from_checkpoint: {resume!r} is not a checkpoint directory; give an existing "
            f"output_dir/checkpoint-N (relative to {Path.cwd()}), auto (the newest complete one), or null"
        )
    return p
