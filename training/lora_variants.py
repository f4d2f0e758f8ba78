"""PEFT's LoRA variants from ``lora:`` (``training/config.py LoraConfig``): the ``peft.LoraConfig``,
the saved tensor set, the PiSSA/OLoRA conversion to a plain LoRA, and the LoRA+ optimizer.

What each variant adds to ``adapter_model.safetensors`` (A is (r, in), B is (out, r) per module)::

    plain LoRA     ...q_proj.lora_A.weight (r, in), ...q_proj.lora_B.weight (out, r)
    use_dora       + ...q_proj.lora_magnitude_vector (out,)
    bias: all      + every ...bias of the model; lora_only: the adapted modules' ...base_layer.bias
    rank_pattern   r of the matching modules replaced
    pissa, olora   saved converted: rank 2r, A' = [A; A0], B' = [B, -B0], alpha 2x (sqrt(2)x with rsLoRA)

PiSSA and OLoRA initialise A0, B0 from each base weight W (SVD, QR) and train on the residual
``W_res = W - s * B0 @ A0``, where ``s`` is the scaling. The trained model is
``W_res + s * B @ A = W + s * (B @ A - B0 @ A0) = W + s' * B' @ A'`` with the concatenations above
and ``s' = s`` (alpha and r both doubled; with rsLoRA, alpha / sqrt(r), alpha grows by sqrt(2)).
So the saved adapter is a plain LoRA on the *original* base, which decode, export, plain PEFT and
serving engines load as any other (PEFT's ``save_pretrained(path_initial_model_for_weight_conversion=)``,
https://github.com/huggingface/peft/tree/main/examples/pissa_finetuning#convert-pissa-to-lora, does
the same; it is done here on the saved file because under ZeRO-3 the model's copy is partitioned).
DoRA's magnitude and trained biases are kept as they are: they act on ``W_res + s B A``, which is
the converted adapter's ``W + s' B' A'``.
"""
from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch

from packlora.core.checkpoint import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from packlora.core.errors import InputError

logger = logging.getLogger(__name__)

DORA_PARAM = "lora_magnitude_vector"
MUTATES_BASE = ("pissa", "olora")  # init_lora_weights values (and pissa_niter_N) that change the base weights


def mutates_base(init_lora_weights) -> bool:
    """True for an init that rewrites the base weights (PiSSA, its fast-SVD form, OLoRA)."""
    return isinstance(init_lora_weights, str) and init_lora_weights.startswith(MUTATES_BASE)


def peft_lora_config(lora_cfg):
    """The ``peft.LoraConfig`` for packlora's ``lora:`` section (``task_type`` CAUSAL_LM)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        use_dora=lora_cfg.use_dora,
        use_rslora=lora_cfg.use_rslora,
        init_lora_weights=lora_cfg.init_lora_weights,
        bias=lora_cfg.bias,
        rank_pattern=dict(lora_cfg.rank_pattern),
        alpha_pattern=dict(lora_cfg.alpha_pattern),
        task_type="CAUSAL_LM",
    )


def check_patterns_matched(model, lora_cfg) -> None:
    """Every ``rank_pattern`` / ``alpha_pattern`` key matches at least one adapted module (PEFT
    ignores one that matches none, so a typo would silently train at the default rank).

    Raises:
        InputError: names each pattern that matched nothing and lists the adapted modules.
    """
    from peft.tuners.lora import LoraLayer

    adapted = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    problems = []
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in getattr(lora_cfg, key):
            # PEFT's rule (peft.utils.other.get_pattern_key): the pattern matches a module-name suffix
            if not any(re.match(rf"(.*\.)?({pattern})$", name) for name in adapted):
                problems.append(f"lora.{key}: {pattern!r} matches none of the {len(adapted)} adapted modules")
    if problems:
        examples = ", ".join(n.removeprefix("base_model.model.") for n in adapted[:3])
        raise InputError("; ".join(problems) + f" (e.g. {examples}); give a module name or a regex of one")


def saved_name(param_name: str, adapter: str = "default") -> str:
    """The key PEFT saves a trainable parameter under: the adapter name dropped, and DoRA's
    ``lora_magnitude_vector.weight`` saved as ``lora_magnitude_vector``.

    >>> saved_name("base_model.model.layers.0.q_proj.lora_A.default.weight")
    'base_model.model.layers.0.q_proj.lora_A.weight'
    >>> saved_name("base_model.model.layers.0.q_proj.lora_magnitude_vector.default.weight")
    'base_model.model.layers.0.q_proj.lora_magnitude_vector'
    >>> saved_name("base_model.model.layers.0.q_proj.base_layer.bias")
    'base_model.model.layers.0.q_proj.base_layer.bias'
    """
    name = param_name.replace(f".{adapter}.", ".")
    return name.removesuffix(".weight") if name.endswith(f"{DORA_PARAM}.weight") else name


def adapter_shapes(model) -> dict[str, tuple[int, ...]]:
    """Full shapes of what a saved adapter must hold: every trainable parameter of a
    ``peft.PeftModel`` (LoRA A/B, DoRA magnitudes, trained biases), by its saved name
    (``saved_name``); ``{}`` for a model without an adapter (``lora: null``). Reads ZeRO-3's
    ``ds_shape`` for partitioned parameters."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return {}
    return {saved_name(n): tuple(getattr(p, "ds_shape", p.shape)) for n, p in model.named_parameters() if p.requires_grad}


def converted_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """``adapter_shapes`` after the PiSSA/OLoRA conversion: A (r, in) -> (2r, in), B (out, r) -> (out, 2r)."""
    out = {}
    for name, shape in shapes.items():
        if ".lora_A." in name:
            shape = (2 * shape[0], *shape[1:])
        elif ".lora_B." in name:
            shape = (shape[0], 2 * shape[1], *shape[2:])
        out[name] = shape
    return out


def initial_adapter(model) -> dict[str, torch.Tensor]:
    """The LoRA A0 and B0 of a freshly built PiSSA/OLoRA model, by saved name, cloned to CPU float32.
    Call right after ``get_peft_model``, before DeepSpeed partitions the new tensors."""
    out = {}
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            out[saved_name(name)] = p.detach().to("cpu", torch.float32).clone()
    return out


def convert_to_plain_lora(ckpt: str | Path, initial: dict[str, torch.Tensor]) -> None:
    """Rewrite a PiSSA/OLoRA adapter saved in ``ckpt`` as the plain LoRA of rank 2r that gives the
    same model on the original base (module docstring): A' = [A; A0], B' = [B, -B0], every alpha
    (``lora_alpha`` and ``alpha_pattern``) times 2 (rsLoRA: sqrt(2)), every rank (``r``,
    ``rank_pattern``) times 2, ``init_lora_weights`` true. Other tensors (DoRA magnitudes,
    biases) are kept. Tensors are stored in the dtype they were saved in.

    Raises:
        InputError: a saved A/B has no initial counterpart in ``initial`` (another adapter).
    """
    from safetensors.torch import load_file, save_file

    ckpt = Path(ckpt)
    tensors = load_file(str(ckpt / ADAPTER_WEIGHTS))
    missing = [k for k in tensors if (".lora_A." in k or ".lora_B." in k) and k not in initial]
    if missing:
        raise InputError(f"{ckpt}: no initial value for {missing[:3]}; cannot convert this adapter")
    out = {}
    for name, t in tensors.items():
        if ".lora_A." in name:
            t = torch.cat([t, initial[name].to(t.dtype)], dim=0)
        elif ".lora_B." in name:
            t = torch.cat([t, -initial[name].to(t.dtype)], dim=1)
        out[name] = t.contiguous()
    save_file(out, str(ckpt / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = json.loads((ckpt / ADAPTER_CONFIG).read_text())
    grow = math.sqrt(2) if config.get("use_rslora") else 2
    config.update(
        r=2 * config["r"], lora_alpha=grow * config["lora_alpha"], init_lora_weights=True,
        rank_pattern={k: 2 * v for k, v in (config.get("rank_pattern") or {}).items()},
        alpha_pattern={k: grow * v for k, v in (config.get("alpha_pattern") or {}).items()},
    )
    # Modules with a rank_pattern but no alpha_pattern entry take the global alpha, which grew too.
    (ckpt / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))


def create_loraplus_optimizer(model, args, loraplus_lr_ratio: float, optimizer_cls, optimizer_kwargs: dict):
    """PEFT's LoRA+ optimizer (``peft.optimizers.create_loraplus_optimizer``): the B matrices and every
    1-D trained parameter (DoRA magnitudes, biases) at ``args.learning_rate * loraplus_lr_ratio``, the A
    matrices at ``args.learning_rate``; ``args.weight_decay`` on all but biases and norms. Empty groups
    are dropped. ``optimizer_cls`` / ``optimizer_kwargs`` are the Trainer's
    (``Trainer.get_optimizer_cls_and_kwargs``), the scheduler the Trainer's (it scales each group)."""
    from peft.optimizers import create_loraplus_optimizer as peft_loraplus

    kwargs = {k: v for k, v in optimizer_kwargs.items() if k != "lr"}

    def without_empty_groups(groups, **kw):  # PEFT always makes 4 groups; DeepSpeed's ZeRO wants no empty one
        return optimizer_cls([g for g in groups if g["params"]], **kw)

    without_empty_groups.__name__ = optimizer_cls.__name__
    optimizer = peft_loraplus(model, without_empty_groups, lr=args.learning_rate, loraplus_lr_ratio=loraplus_lr_ratio,
                              loraplus_weight_decay=args.weight_decay, **kwargs)
    lrs = sorted({g["lr"] for g in optimizer.param_groups})
    logger.info("LoRA+: learning rates %s (lora_B at %g x %g)", lrs, args.learning_rate, loraplus_lr_ratio)
    return optimizer
