"""Run configuration: one YAML file per run, ``key.sub=value`` overrides, typed sections.

    output_dir: runs/shishuo-tiny
    deepspeed: zero3.json            # a file in ds_configs/ or a path; null for no DeepSpeed
    model: {config: {model_type: qwen2, hidden_size: 128}, tokenizer: ../shared/assets/qwen2-tokenizer}
    data: {train: [../shared/data/shishuo/stage2_rewrite.jsonl], max_seq_length: 1024}
    training: {max_steps: 30, learning_rate: 2.0e-4}     # transformers.TrainingArguments fields

    $ packlora inspect configs/shishuo_tiny.yaml training.max_steps=5 data.max_seq_length=512

Each section validates itself when built (``core.config.Section``: types, choices,
bounds, cross-field rules); ``load_config`` reports every problem at once, each naming its key.
It has no side effects: files, the preset and ``training:`` keys are checked by
``training/preflight.py``, an explicit second step taken before any work.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from packlora.core.checkpoint import DecodingConfig
from packlora.core.config import ConfigError, Section, build_config, load_yaml_config, parse_overrides
from packlora.data_utils.config import DataConfig
from packlora.training.backends import AttnImplementation, backend

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
INIT_LORA_WEIGHTS = ("gaussian", "pissa", "olora")  # besides true; see LoraConfig.init_lora_weights
PISSA_NITER = re.compile(r"pissa_niter_[1-9][0-9]*")
UNSUPPORTED_INITS = {  # PEFT's other init_lora_weights values, and why packlora does not pass them
    "false": "random A and B, PEFT's debugging init: the model changes before training",
    "loftq": "it quantises the base to 4 bits (QLoRA), which needs bitsandbytes and CUDA; packlora trains "
             "unquantised bases",
    "eva": "it needs a pass over the training data before training, which packlora does not run",
    "corda": "it needs a pass over the training data before training, which packlora does not run",
    "lora_ga": "it needs gradients of the training data before training, which packlora does not run",
}
OWNED_TRAINING_KEYS = {  # TrainingArguments keys packlora sets itself, and where the user sets them instead
    "output_dir": "output_dir", "deepspeed": "deepspeed", "seed": "seed", "data_seed": "seed",
    "bf16": "model.dtype", "fp16": "model.dtype", "remove_unused_columns": "(packlora needs seq_lens kept)",
}


@dataclass(frozen=True, kw_only=True)
class ModelConfig(Section):
    """Base model and tokenizer. Exactly one of ``name_or_path`` / ``config`` is set."""

    section = "model"

    name_or_path: str | None = None
    """A Hugging Face model directory."""
    config: dict | None = None
    """A model config (needs ``model_type``) to build a randomly initialised base from;
    ``vocab_size`` defaults to the tokenizer's length. The base is saved to ``output_dir/base_model``."""
    tokenizer: str | None = None
    """Tokenizer directory; defaults to ``name_or_path``."""
    attn_implementation: AttnImplementation = "sdpa"
    """A row of ``training/backends.py``: ``sdpa`` (block-diagonal mask from the restarting
    positions), ``packed_sdpa`` (SDPA per packed segment, no mask), ``varlen`` (GPU: PyTorch's own
    Flash Attention varlen kernel on the flattened batch, bf16/fp16, nothing to install), ``eager``,
    ``flash_attention_2`` (GPU, the flash-attn package) or ``flex_attention`` (GPU for training)."""
    dtype: Dtype = "auto"
    """Weights and compute dtype. ``auto``: bfloat16 on CUDA, float32 on CPU."""
    trust_remote_code: bool = False
    """Run code shipped with the model. Off unless you trust the model's source."""
    lm_head_positions: Literal["supervised", "all"] = "supervised"
    """Where the LM head (vocabulary projection) and the loss run, in training and in the evaluation
    loss. ``supervised``: only at the positions whose next label trains, a chunk of positions at a
    time, so the ``[tokens x vocab]`` logits are never built (training/lm_head.py); the same loss.
    ``all``: every position, full logits, as transformers does by default (kept for comparison)."""
    lm_head_chunk_tokens: int | None = field(default=None, metadata={"min": 1, "unit": "tokens"})
    """Positions projected at once with ``lm_head_positions: supervised``; null: as many as fit in
    64 MiB of float32 logits (110 at Qwen2's 151,936-id vocabulary)."""

    def rules(self) -> list[str]:
        p = []
        if (self.name_or_path is None) == (self.config is None):
            p.append("model.name_or_path / model.config: set exactly one (a model directory, or a config to build from)")
        if self.config is not None and "model_type" not in self.config:
            p.append("model.config: must be a mapping with a model_type (e.g. qwen2)")
        if self.name_or_path is None and self.tokenizer is None:
            p.append("model.tokenizer: required when the model is built from model.config")
        if backend(self.attn_implementation).half_precision_only and self.dtype == "float32":
            p.append(f"model.dtype: float32 with model.attn_implementation: {self.attn_implementation}; Flash Attention "
                     "takes bfloat16 or float16 only: set model.dtype: bfloat16 (or auto, bf16 on CUDA)")
        if self.lm_head_chunk_tokens is not None and self.lm_head_positions == "all":
            p.append("model.lm_head_chunk_tokens: only used with model.lm_head_positions: supervised; remove it or set "
                     "lm_head_positions: supervised")
        return p


@dataclass(frozen=True, kw_only=True)
class LoraConfig(Section):
    """PEFT LoRA hyper-parameters (``peft.LoraConfig``)."""

    section = "lora"

    r: int = field(default=16, metadata={"min": 1})
    """Rank of the update matrices."""
    alpha: float = field(default=32, metadata={"min": 1e-9})
    """Scaling numerator: the update is scaled by ``alpha / r``."""
    dropout: float = field(default=0.05, metadata={"min": 0, "max": 0.999})
    """Dropout on the LoRA input, in [0, 1)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Module names to adapt (Qwen2/Llama projection names by default)."""
    use_dora: bool = False
    """DoRA (Liu et al. 2024, arXiv:2402.09353): a trained magnitude vector per output row on top of
    the LoRA direction; the adapter gains one ``lora_magnitude_vector`` of shape (out,) per module."""
    use_rslora: bool = False
    """Rank-stabilised LoRA (Kalajdzievski 2023, arXiv:2312.03732): scale by ``alpha / sqrt(r)``
    instead of ``alpha / r``."""
    init_lora_weights: bool | str = True
    """``true``: A random, B zero (the update starts at zero). ``gaussian``: A Gaussian with std
    ``1/r``. ``pissa`` (or ``pissa_niter_N``, fast SVD with N subspace iterations): A, B from the
    top-r singular vectors of each base weight, which keeps the residual (arXiv:2404.02948).
    ``olora``: A, B from a QR decomposition of each base weight (arXiv:2406.01775). pissa and olora
    change the base weights; every saved adapter is converted to a plain LoRA of rank 2r on the
    original base (PEFT's conversion, ``training/lora_variants.py``)."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Also train biases: ``all`` every bias of the model, ``lora_only`` those of the adapted
    modules. They are saved in the adapter (and change the base's output when the adapter is off)."""
    rank_pattern: dict = field(default_factory=dict)
    """Module name or regex -> rank, for modules whose rank differs from ``r`` (PEFT's
    ``rank_pattern``), e.g. ``{"layers\\.0\\.self_attn\\.q_proj": 4}``. Each must match an adapted module."""
    alpha_pattern: dict = field(default_factory=dict)
    """Module name or regex -> alpha, as ``rank_pattern``."""
    loraplus_lr_ratio: float | None = field(default=None, metadata={"min": 1e-9})
    """LoRA+ (Hayou et al. 2024, arXiv:2402.12354): the B matrices learn at ``learning_rate *
    loraplus_lr_ratio`` (the paper suggests 16), the rest at ``learning_rate``; PEFT's
    ``create_loraplus_optimizer`` builds the optimizer. null: one learning rate."""

    def rules(self) -> list[str]:
        p = [] if self.target_modules else ["lora.target_modules: give at least one module name"]
        init = self.init_lora_weights
        if not (init is True or init in INIT_LORA_WEIGHTS or (isinstance(init, str) and PISSA_NITER.fullmatch(init))):
            why = UNSUPPORTED_INITS.get(init if isinstance(init, str) else str(init).lower(), "")
            p.append(f"lora.init_lora_weights: {init!r} is not supported{f' ({why})' if why else ''}; use true "
                     "(the default), " + ", ".join(INIT_LORA_WEIGHTS) + " or pissa_niter_N (N >= 1)")
        for key, pattern, kind in (("rank_pattern", self.rank_pattern, int), ("alpha_pattern", self.alpha_pattern, float)):
            for name, value in pattern.items():
                if not isinstance(name, str) or not name:
                    p.append(f"lora.{key}: key {name!r} must be a module name or regex (a non-empty string)")
                ok = kind is int and isinstance(value, int) and value >= 1
                ok |= kind is float and isinstance(value, (int, float)) and value > 0
                if isinstance(value, bool) or not ok:
                    p.append(f"lora.{key}.{name}: must be {'an integer >= 1' if kind is int else 'a number > 0'}, "
                             f"got {value!r}")
        return p


@dataclass(frozen=True, kw_only=True)
class RunawayEvalConfig(Section):
    """Runaway metrics on held-out prompts during training (``training/runaway_callback.py``)."""

    section = "runaway_eval"

    every_steps: int = field(default=0, metadata={"min": 0, "unit": "optimizer steps"})
    """Every this many optimizer steps (0 = off); needs ``data.eval_holdout`` >= 1."""
    num_prompts: int = field(default=4, metadata={"min": 1})
    """The first ``num_prompts`` held-out chats are decoded each time."""
    max_new_tokens: int = field(default=64, metadata={"min": 1, "unit": "tokens"})
    """Tokens per reply before it counts as ``hit_max_new_tokens``."""


@dataclass(frozen=True, kw_only=True)
class RunConfig(Section):
    """A whole run. ``training`` is passed to ``transformers.TrainingArguments`` as is."""

    output_dir: str
    """Checkpoints, TensorBoard logs (``output_dir/runs``), reports and the resolved config."""
    seed: int = 42
    """Seeds data order, LoRA init, hold-out draw and a config-built base model."""
    deepspeed: str | None = "zero3.json"
    """A file in ``ds_configs/`` (``zero2.json``, ``zero3.json``) or a path; null disables DeepSpeed."""
    log_batch_digests: bool = False
    """Debug: each rank appends a digest of every batch it trains on to ``output_dir/batches.rank{R}.jsonl``."""
    gpus_per_node: int | None = field(default=None, metadata={"min": 0})
    """GPUs of each Slurm node for ``packlora slurm`` when ``--gpus-per-node`` is not given (0: CPU
    processes with gloo); null: the partition's GRES decides, when unambiguous. Never the submit host's."""
    preset: str | None = None
    """A style preset (``presets/``: ``zhang_henshui``, ``shishuo``, ``none``, or a YAML path): its
    system prompt and guard go into the chats (see presets/__init__.py), its stop tokens join
    ``decoding.stop_tokens``."""
    preset_overrides_system: bool = False
    """Let the preset replace a system message of the record's own (default: keep it)."""
    init_from: str | None = None
    """Stage 2 from stage 1: a packlora checkpoint directory to start from (see ``init_mode``)."""
    init_mode: Literal["merge", "continue"] = "merge"
    """``merge``: merge ``init_from``'s adapter into its base, save that as ``output_dir/base_model``
    and train a fresh LoRA on it. ``continue``: keep training ``init_from``'s adapter (same base)."""
    early_stopping_patience: int | None = field(default=None, metadata={"min": 1})
    """Stop after this many evaluations without a lower ``eval_loss`` and end on the best checkpoint
    (``load_best_model_at_end``); needs ``data.eval`` or ``data.eval_split``. null: off."""
    loss_normalization: Literal["per_token", "per_example"] = "per_token"
    """``per_token``: every trained token weighs the same over the whole optimizer step (all
    accumulation steps and ranks). ``per_example``: every example weighs the same whatever its
    length. Formulas in ``training/loss.py``."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig | None = field(default_factory=LoraConfig)
    """LoRA settings; ``lora: null`` trains every parameter of the base (full fine-tuning)."""
    data: DataConfig = field(default_factory=DataConfig)
    training: dict = field(default_factory=dict)
    """``transformers.TrainingArguments`` fields, except those packlora owns (``OWNED_TRAINING_KEYS``)."""
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    runaway_eval: RunawayEvalConfig = field(default_factory=RunawayEvalConfig)

    def rules(self) -> list[str]:
        p = [f"training.{k}: set by packlora; use {v} instead" for k, v in OWNED_TRAINING_KEYS.items() if k in self.training]
        if self.runaway_eval.every_steps and self.data.eval_holdout < 1:
            p.append("runaway_eval.every_steps: needs held-out prompts; set data.eval_holdout >= 1 or every_steps: 0")
        if backend(self.model.attn_implementation).isolates_by_construction and self.data.labels == "legacy_full_sequence":
            p.append(f"data.labels: legacy_full_sequence cannot run with model.attn_implementation: "
                     f"{self.model.attn_implementation}, which isolates segments by construction; use sdpa or eager")
        evaluates = bool(self.data.eval) or self.data.eval_split is not None
        wants = [f"training.{k}" for k in ("eval_strategy", "load_best_model_at_end") if self.training.get(k) not in
                 (None, False, "no")] + (["early_stopping_patience"] if self.early_stopping_patience else [])
        p += [f"{k}: needs an evaluation set; set data.eval (sources) or data.eval_split" for k in wants if not evaluates]
        if self.init_mode == "continue" and self.lora is None:
            p.append("init_mode: continue keeps training a LoRA adapter; it cannot be combined with lora: null")
        p += self._lora_variant_rules()
        if not self.output_dir:
            p.append("output_dir: required (where checkpoints and logs go)")
        return p

    def _lora_variant_rules(self) -> list[str]:
        """The LoRA variants against the rest of the run (the DeepSpeed JSON is read in preflight)."""
        lora, p = self.lora, []
        if lora is None:
            return p
        init = lora.init_lora_weights
        if self.init_from and self.init_mode == "continue" and init is not True:
            p.append(f"lora.init_lora_weights: {init!r} initialises a fresh LoRA, but init_mode: continue keeps "
                     "training the stage-1 adapter; remove it, or use init_mode: merge")
        if isinstance(init, str) and init.startswith(("pissa", "olora")) and not self.deepspeed:
            reloads = [f"training.{k}" for k in ("resume_from_checkpoint", "load_best_model_at_end") if self.training.get(k)]
            reloads += ["early_stopping_patience"] if self.early_stopping_patience else []
            p += [f"{k}: cannot reload a checkpoint of lora.init_lora_weights: {init} with deepspeed: null. Its "
                  "checkpoints hold the adapter converted for the original base (rank 2r), which the Trainer cannot "
                  "load back into the rank-r model it trains; use deepspeed: zero2.json or zero3.json (they reload "
                  "DeepSpeed's own state)" for k in reloads]
        return p

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_SECTIONS = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "decoding": DecodingConfig,
             "runaway_eval": RunawayEvalConfig}


def load_config(path: str | Path, overrides=()) -> RunConfig:
    """Read a YAML run config with ``yaml.safe_load``, apply ``key.sub=value`` overrides, validate.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: every problem found, each naming its key; a key set by an override is marked
            "(set on the command line)".
    """
    return load_yaml_config(path, overrides, config_from_dict)


def config_from_dict(raw: dict, source: str = "config") -> RunConfig:
    """Build and validate a ``RunConfig`` from a plain dict (see ``load_config``).

    Raises:
        ConfigError: every problem, each naming its key.
    """
    training = raw.get("training") if isinstance(raw.get("training"), dict) else {}
    owned = [f"training.{k}: set by packlora; use {v} instead" for k, v in OWNED_TRAINING_KEYS.items() if k in training]
    try:
        return build_config(RunConfig, raw, _SECTIONS, source, nullable=("lora",))
    except ConfigError as e:  # the owned keys too, also when another section failed first
        raise ConfigError(list(dict.fromkeys(owned + e.problems)), source) from None
