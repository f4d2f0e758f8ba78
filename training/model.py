"""Tokenizer, base model and PEFT LoRA model from a ``RunConfig``."""
from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import torch

from training.config import LoraConfig, ModelConfig, RunConfig

logger = logging.getLogger(__name__)
BASE_MODEL_DIR = "base_model"


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 on CPU (bf16 training on CPU is refused by transformers)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def load_tokenizer(model_cfg: ModelConfig):
    """Load the tokenizer; give it a pad token (its EOS) if it has none.

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    from transformers import AutoTokenizer

    path = model_cfg.tokenizer or model_cfg.name_or_path
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise ValueError(f"model.tokenizer: {path} has no chat template; packlora renders chats with it")
    return tok


@contextlib.contextmanager
def _without_zero3_init(args):
    """Build a model in one process without DeepSpeed's ZeRO-3 ``zero.Init`` (which needs every rank)."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    ds = getattr(args, "hf_deepspeed_config", None)
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if ds is not None:
            set_hf_deepspeed_config(ds)


def materialize_base(cfg: RunConfig, tokenizer, args) -> str:
    """Return the base model directory; for ``model.config`` build it once, seeded, and save it
    to ``output_dir/base_model`` (with the tokenizer) so checkpoints decode and runs resume on the
    identical base. Call inside ``args.main_process_first()``.

    Raises:
        ValueError: ``output_dir/base_model`` exists but was built from a different config or seed,
            or ``model.config.vocab_size`` is smaller than the tokenizer.
    """
    if cfg.model.name_or_path:
        return str(Path(cfg.model.name_or_path).resolve())
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    out = Path(cfg.output_dir).resolve() / BASE_MODEL_DIR
    spec = dict(cfg.model.config)
    spec.setdefault("vocab_size", len(tokenizer))
    if spec["vocab_size"] < len(tokenizer):
        raise ValueError(
            f"model.config.vocab_size={spec['vocab_size']} is smaller than the tokenizer ({len(tokenizer)} ids); "
            "remove it to default to the tokenizer's length"
        )
    recipe = {"config": spec, "seed": cfg.seed}
    marker = out / "packlora_base.json"
    if marker.is_file():
        if json.loads(marker.read_text()) != recipe:
            raise ValueError(
                f"{out} was built from a different model.config or seed; use a new output_dir or delete it"
            )
        return str(out)
    if args.process_index == 0:
        model_type = spec["model_type"]
        config = AutoConfig.for_model(model_type, **{k: v for k, v in spec.items() if k != "model_type"})
        set_seed(cfg.seed)
        with _without_zero3_init(args):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        marker.write_text(json.dumps(recipe, indent=1))
        logger.info("built base model %s (%.2fM params) -> %s", model_type, model.num_parameters() / 1e6, out)
    return str(out)


def build_model(base_path: str, model_cfg: ModelConfig, lora_cfg: LoraConfig, seed: int):
    """Load the base (under ZeRO-3 ``zero.Init`` when the DeepSpeed config says so), freeze it and
    attach a fresh LoRA. Seeds first: LoRA A matrices are drawn from the global RNG.

    Returns:
        A ``peft.PeftModel``; only ``lora_`` parameters require grad.
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    model = AutoModelForCausalLM.from_pretrained(
        base_path,
        dtype=resolve_dtype(model_cfg.dtype),
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    model.config.use_cache = False  # a KV cache disables packed-sequence masks
    set_seed(seed)
    peft_cfg = PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, peft_cfg)
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    logger.info("LoRA: %d trainable of %d parameters (%.3f%%)", trainable, total, 100 * trainable / max(total, 1))
    return model


def _numel(p) -> int:
    """Full element count, also for ZeRO-3 partitioned parameters (``ds_numel``)."""
    return getattr(p, "ds_numel", p.numel())


def lora_shapes(model) -> dict[str, tuple[int, ...]]:
    """Full shapes of the LoRA tensors as they are named in a saved adapter file."""
    shapes = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            shape = tuple(getattr(p, "ds_shape", p.shape))
            shapes[name.replace(".default", "")] = shape
    return shapes
