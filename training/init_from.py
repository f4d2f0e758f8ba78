"""Stage 2 from stage 1: ``init_from: <stage-1 checkpoint>`` with ``init_mode: merge | continue``.

======== =========================================== =============================================
mode     what training starts from                   what the stage-2 checkpoint is
======== =========================================== =============================================
merge    stage-1 base + stage-1 adapter, merged into  a fresh LoRA adapter on
         new dense weights, saved once (rank 0,       ``output_dir/base_model`` (the merged base,
         without ZeRO-3 ``zero.Init``) to             with tokenizer); it decodes stand-alone,
         ``output_dir/base_model``; a fresh LoRA      with no reference to the stage-1 directory.
         (``lora:``) is attached on top.
continue the stage-1 base, and the stage-1 adapter    the stage-1 adapter trained further; its
         loaded as trainable (its r / alpha /         ``adapter_config.json`` names the stage-1
         target modules; ``lora:`` must match them).  base, which must stay where it is (or use
                                                      ``packlora export --merge`` for a dense copy).
======== =========================================== =============================================

A stage-1 checkpoint that is a full model (``lora: null`` in stage 1) is itself the base in both
modes (``continue`` is refused: there is no adapter to continue).

    packlora launch configs/zhanghenshui/stage2.yaml          # init_from: runs/zhanghenshui/stage1
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from packlora.core.checkpoint import (
    ADAPTER_CONFIG,
    BASE_MARKER,
    BASE_MODEL_DIR,
    MODEL_CONFIG,
    MergeMismatchError,
    adapter_sha256,
    is_adapter,
    merge_adapter,
    resolve_base_model,
    save_merged,
    set_stop_ids,
)
from packlora.core.errors import InputError
from packlora.training.distributed import without_zero3_init

logger = logging.getLogger(__name__)
MARKER = BASE_MARKER


def stage1_base(checkpoint: str | Path) -> Path:
    """The base model directory under a stage-1 checkpoint: its adapter's base, or itself for a
    full model.

    Raises:
        MissingPathError: the adapter's base cannot be found (``core.checkpoint.CheckpointInfo.base_model_path``).
    """
    checkpoint = Path(checkpoint).resolve()
    return resolve_base_model(checkpoint).resolve() if is_adapter(checkpoint) else checkpoint


def init_adapter(cfg) -> str | None:
    """The adapter directory to keep training (``init_mode: continue``), else None.

    Raises:
        InputError: ``lora:`` differs from the stage-1 adapter's r / alpha / target modules / variant
            (``use_dora``, ``use_rslora``, ``bias``, ``rank_pattern``, ``alpha_pattern``).
    """
    if not cfg.init_from or cfg.init_mode != "continue":
        return None
    ckpt = Path(cfg.init_from).resolve()
    saved = json.loads((ckpt / ADAPTER_CONFIG).read_text())
    lora = cfg.lora
    ours = {"r": lora.r, "lora_alpha": lora.alpha, "target_modules": sorted(lora.target_modules),
            "use_dora": lora.use_dora, "use_rslora": lora.use_rslora, "bias": lora.bias,
            "rank_pattern": dict(lora.rank_pattern), "alpha_pattern": dict(lora.alpha_pattern)}
    theirs = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"), "target_modules": sorted(saved.get("target_modules") or []),
              "use_dora": bool(saved.get("use_dora")), "use_rslora": bool(saved.get("use_rslora")),
              "bias": saved.get("bias", "none"), "rank_pattern": saved.get("rank_pattern") or {},
              "alpha_pattern": saved.get("alpha_pattern") or {}}
    diff = [f"lora.{'alpha' if k == 'lora_alpha' else k}: {ours[k]!r} here, {theirs[k]!r} in stage 1" for k in ours if ours[k] != theirs[k]]
    if diff:
        raise InputError(
            f"init_mode: continue keeps training the adapter of {ckpt}, but " + "; ".join(diff)
            + ". Set lora: to the stage-1 values, or use init_mode: merge for a fresh LoRA"
        )
    return str(ckpt)


def materialize_init_base(cfg, tokenizer, args, stop_ids: list[int], pad_id: int) -> str:
    """The base model directory for a run with ``init_from``. Call inside
    ``args.main_process_first(local=False)``.

    ``continue`` (or a full-model stage 1): the stage-1 base itself. ``merge``: rank 0 loads the
    stage-1 base in float32 without ``zero.Init``, merges the adapter (W + alpha/r * B @ A; a tied
    embedding the adapter touches is untied first), checks the merge on a probe batch against the
    adapter (``core.checkpoint.merge_adapter``), casts back to the base's dtype and saves it with
    the tokenizer and the run's ``stop_ids`` (as ``generation_config.eos_token_id``) to
    ``output_dir/base_model``, with a ``packlora_base.json`` that records where it came from (a
    resumed run reuses it).

    Raises:
        ValueError: ``output_dir/base_model`` was made from another checkpoint or adapter, or
            ``model.name_or_path`` names a base other than the stage-1 one.
        MergeMismatchError: the merged base's logits differ from the stage-1 adapter's (nothing is kept).
        FileNotFoundError: the stage-1 base is missing.
    """
    ckpt = Path(cfg.init_from).resolve()
    base = stage1_base(ckpt)
    if cfg.model.name_or_path and Path(cfg.model.name_or_path).resolve() != base:
        raise InputError(
            f"model.name_or_path={cfg.model.name_or_path!r} but init_from={cfg.init_from!r} was trained on {base}; "
            "stage 2 starts from the stage-1 base: set model.name_or_path to it (or remove init_from)"
        )
    if cfg.init_mode == "continue" or not is_adapter(ckpt):
        logger.info("init_from %s (%s): base %s", ckpt, cfg.init_mode, base)
        return str(base)

    out = Path(cfg.output_dir).resolve() / BASE_MODEL_DIR
    # What the merged base is made of, by content: the same after the runs are moved or copied.
    recipe = {"init_mode": "merge", "adapter_sha256": adapter_sha256(ckpt), "stage1_base": _model_identity(base)}
    marker = out / MARKER
    if marker.is_file():
        made = json.loads(marker.read_text())
        if {k: made.get(k) for k in recipe} != recipe:
            raise InputError(f"{out} holds a base merged from another checkpoint or base ({made}); use a new "
                             "output_dir or delete it")
        return str(out)
    recipe.update(init_from=str(ckpt), stage1_base_path=str(base))  # where they were, for the record
    if args.process_index == 0:
        with without_zero3_init(args):
            merged, dtype = merge_adapter(ckpt, base)  # proven on a probe batch against the adapter
            set_stop_ids(merged, stop_ids, pad_id)
            try:
                save_merged(merged, dtype, out)
            except MergeMismatchError:
                shutil.rmtree(out, ignore_errors=True)  # no half-proven base for a later run to reuse
                raise
        tokenizer.save_pretrained(out)
        marker.write_text(json.dumps(recipe, indent=1))
        logger.info("merged stage-1 adapter %s into %s -> %s (%s)", ckpt, base, out, str(dtype).removeprefix("torch."))
    return str(out)


def _model_identity(model_dir: Path) -> str:
    """sha256 of a model directory's ``config.json`` and the names and sizes of its weight files:
    cheap for a 7B model, and unchanged when the directory is moved or copied."""
    h = hashlib.sha256((model_dir / MODEL_CONFIG).read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()
