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

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")
DTYPES = ("auto", "float32", "bfloat16", "float16")
OVERFLOW_POLICIES = ("auto", "drop", "error", "split")
DATA_FORMATS = ("auto", "messages", "sharegpt", "alpaca", "text")
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
    """One of ``sdpa``, ``eager`` (CPU or GPU), ``flash_attention_2`` (GPU), ``flex_attention``."""
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


@dataclass(kw_only=True)
class DecodingConfig:
    """Stop handling written into every checkpoint's ``generation_config.json``."""

    stop_tokens: list[str] = field(default_factory=lambda: ["<|im_end|>", "<|endoftext|>"])
    """Tokens that end generation; their ids become ``generation_config.eos_token_id``."""
    max_new_tokens: int = 512
    """Generation length limit, in tokens."""


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
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: dict = field(default_factory=dict)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)

    def deepspeed_path(self) -> str | None:
        """The DeepSpeed JSON to use, resolved against ``ds_configs/`` for bare names."""
        return resolve_deepspeed_config(self.deepspeed) if self.deepspeed else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "decoding": DecodingConfig}


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
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            problems.append(f"{name}: must be a mapping, got {type(section).__name__}")
            continue
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in section if k not in valid]
        problems += [f"{name}.{k}: unknown key; valid keys are {sorted(valid)}" for k in unknown]
        kwargs[name] = cls(**{k: v for k, v in section.items() if k in valid})
    for key in ("output_dir", "seed", "deepspeed", "log_batch_digests", "training"):
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
    if not isinstance(lo.r, int) or lo.r < 1:
        p.append(f"lora.r: must be an integer >= 1, got {lo.r!r}")
    if not isinstance(lo.alpha, (int, float)) or lo.alpha <= 0:
        p.append(f"lora.alpha: must be > 0, got {lo.alpha!r}")
    if not isinstance(lo.dropout, (int, float)) or not 0 <= lo.dropout < 1:
        p.append(f"lora.dropout: must be in [0, 1), got {lo.dropout!r}")
    if not isinstance(lo.target_modules, list) or not lo.target_modules:
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


def _validate_training(training: dict) -> list[str]:
    from transformers import TrainingArguments

    valid = {f.name for f in dataclasses.fields(TrainingArguments)}
    p = []
    for key in training:
        if key in OWNED_TRAINING_KEYS:
            p.append(f"training.{key}: set by packlora; use {OWNED_TRAINING_KEYS[key]} instead")
        elif key not in valid:
            p.append(f"training.{key}: not a transformers.TrainingArguments field")
    return p
