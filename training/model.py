"""Tokenizer, base model and PEFT LoRA model from a ``RunConfig``."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from packlora.core.checkpoint import BASE_MARKER, BASE_MODEL_DIR, set_stop_ids
from packlora.core.errors import InputError
from packlora.core.quiet import peft_wrapping
from packlora.training import packed_attention  # noqa: F401  (registers attn_implementation packed_sdpa)
from packlora.training import varlen_attention  # noqa: F401  (registers attn_implementation varlen)
from packlora.training.backends import cannot_train_here
from packlora.training.config import LoraConfig, ModelConfig, RunConfig
from packlora.training.distributed import without_zero3_init
from packlora.training.isolation import install_isolation_guard

logger = logging.getLogger(__name__)


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 on CPU (bfloat16 works on CPU too, when asked for)."""
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
        raise InputError(f"model.tokenizer: {path} has no chat template; packlora renders chats with it")
    return tok


def materialize_base(cfg: RunConfig, tokenizer, args, stop_ids: list[int], pad_id: int) -> str:
    """Return the base model directory; for ``model.config`` build it once, seeded, and save it
    to ``output_dir/base_model`` (with the tokenizer) so checkpoints decode and runs resume on the
    identical base. Call inside ``args.main_process_first()``.

    A base packlora saves carries the run's ``stop_ids`` as ``generation_config.eos_token_id``, so
    plain ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), ckpt)`` stops at
    the end of turn too (PEFT never reads the checkpoint's own ``generation_config.json``).

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
        raise InputError(
            f"model.config.vocab_size={spec['vocab_size']} is smaller than the tokenizer ({len(tokenizer)} ids); "
            "remove it to default to the tokenizer's length"
        )
    recipe = {"config": spec, "seed": cfg.seed}
    marker = out / BASE_MARKER
    if marker.is_file():
        if json.loads(marker.read_text()) != recipe:
            raise InputError(
                f"{out} was built from a different model.config or seed; use a new output_dir or delete it"
            )
        return str(out)
    if args.process_index == 0:
        model_type = spec["model_type"]
        config = AutoConfig.for_model(model_type, **{k: v for k, v in spec.items() if k != "model_type"})
        set_seed(cfg.seed)
        with without_zero3_init(args):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        set_stop_ids(model, stop_ids, pad_id)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        marker.write_text(json.dumps(recipe, indent=1))
        logger.info("built base model %s (%.2fM params) -> %s", model_type, model.num_parameters() / 1e6, out)
    return str(out)


def check_attention_backend(attn_implementation: str, cuda: bool) -> None:
    """Refuse, before any work, a backend that cannot train on this machine (``training/backends.py``:
    CUDA only, no CPU backward, or a kernel this torch lacks).

    Raises:
        InputError: e.g. ``flex_attention`` without CUDA (torch 2.13 has no flex backward on CPU),
            ``flash_attention_2`` without CUDA, or ``varlen`` without CUDA or without
            ``torch.nn.attention.varlen`` (each message names the fix).
    """
    reason = cannot_train_here(attn_implementation, cuda)
    if reason:
        raise InputError(reason)


def check_dtype(dtype: str, cuda: bool) -> None:
    """Refuse, before any work, a ``model.dtype`` this machine cannot train in.

    Raises:
        ValueError: ``float16`` without CUDA (DeepSpeed refuses fp16 on its CPU accelerator,
            ``Type fp16 is not supported on your device``, after every process has started).
    """
    if dtype == "float16" and not cuda:
        raise InputError("model.dtype: float16 needs a CUDA GPU (DeepSpeed has no fp16 on CPU); use bfloat16 or "
                         "float32 on CPU")


def check_runs_here(model_cfg: ModelConfig, cuda: bool | None = None) -> None:
    """``check_attention_backend`` and ``check_dtype`` for this machine (``cuda``: default, whether
    torch sees a CUDA device). Called by ``packlora launch`` before it starts any process, and
    by every training process before the process group exists."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    check_attention_backend(model_cfg.attn_implementation, cuda)
    check_dtype(model_cfg.dtype, cuda)


def build_model(base_path: str, model_cfg: ModelConfig, lora_cfg: LoraConfig | None, seed: int,
                init_adapter: str | None = None):
    """Load the base (under ZeRO-3 ``zero.Init`` when the DeepSpeed config says so), freeze it and
    attach a fresh LoRA. Seeds first: LoRA A matrices are drawn from the global RNG.
    With ``lora_cfg=None`` (``lora: null``) the base itself is returned, every parameter trainable.
    With ``init_adapter`` (``init_mode: continue``) that saved adapter is loaded as trainable instead
    of a fresh LoRA.

    Returns:
        A ``peft.PeftModel``; only the adapter's parameters require grad (LoRA A/B, DoRA magnitudes,
        biases with ``lora.bias``). Or, without LoRA, the
        ``AutoModelForCausalLM`` with every parameter requiring grad.
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    from packlora.training.lora_variants import check_patterns_matched, peft_lora_config

    check_runs_here(model_cfg)
    model = AutoModelForCausalLM.from_pretrained(
        base_path,
        use_safetensors=True,  # never unpickle weights
        dtype=resolve_dtype(model_cfg.dtype),
        attn_implementation=model_cfg.attn_implementation,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    model.config.use_cache = False  # a KV cache disables packed-sequence masks
    install_isolation_guard(model)  # refuse inputs that would let packed examples see each other
    set_seed(seed)
    if lora_cfg is None:
        total = sum(_numel(p) for p in model.parameters())
        logger.info("full-parameter training (lora: null): all %d parameters trainable", total)
        return model
    if init_adapter is not None:
        from peft import PeftModel

        with peft_wrapping():
            model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
        logger.info("continuing the LoRA adapter of %s", init_adapter)
    else:
        # PiSSA/OLoRA/DoRA read each base weight here; PEFT gathers it under ZeRO-3 (gather_params_ctx)
        with peft_wrapping():
            model = get_peft_model(model, peft_lora_config(lora_cfg))
        check_patterns_matched(model, lora_cfg)
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    logger.info("LoRA: %d trainable of %d parameters (%.3f%%)", trainable, total, 100 * trainable / max(total, 1))
    return model


def _numel(p) -> int:
    """Full element count, also for ZeRO-3 partitioned parameters (``ds_numel``)."""
    return getattr(p, "ds_numel", p.numel())


def lora_shapes(model) -> dict[str, tuple[int, ...]]:
    """Full shapes of the tensors a saved adapter must hold, as they are named in the file: every
    trainable parameter of the adapter (``training.lora_variants.adapter_shapes``)."""
    from packlora.training.lora_variants import adapter_shapes

    return adapter_shapes(model)


def align_special_tokens(model, tokenizer, stop_ids: list[int], pad_id: int) -> str:
    """Set the model's eos, pad and bos (its config and its generation config) from the run's chat
    format, before the Trainer compares them with the tokenizer.

    transformers 5.24's ``Trainer`` (``trainer_utils.align_special_tokens``) rewrites any of them
    that does not hold the tokenizer's own, and logs "Updated tokens: {'eos_token_id': 151643}": a
    config-built base whose ``config.eos_token_id`` is a single id read as if ``<|im_end|>`` had been
    dropped (it had not: the generation config keeps every stop id). Here ``eos_token_id`` becomes
    the stop ids (plus the tokenizer's eos when they lack it: what transformers would add), and
    ``pad_token_id`` the run's pad id, so the comparison finds nothing to change. Checkpoints
    still get their ``generation_config.json`` from the stop ids alone (``core.checkpoint.write_extras``).

    Returns:
        One line for the log: the ids now in force.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    eos = list(stop_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    configs = [inner.config.get_text_config()]
    if getattr(inner, "generation_config", None) is not None:
        configs.append(inner.generation_config)
    for c in configs:
        c.eos_token_id, c.pad_token_id = list(eos), pad_id
        if tokenizer.bos_token_id is not None:
            c.bos_token_id = tokenizer.bos_token_id
    return (f"stop ids in force: eos_token_id {eos} (model config and generation config), pad_token_id {pad_id}"
            + (f", bos_token_id {tokenizer.bos_token_id}" if tokenizer.bos_token_id is not None else ""))
