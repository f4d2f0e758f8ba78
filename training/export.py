"""``packlora export CHECKPOINT --merge OUT_DIR``: a LoRA checkpoint -> a standard merged model.

    packlora export runs/zhanghenshui/stage2 --merge runs/zhanghenshui/stage2-merged

``OUT_DIR`` gets what plain ``AutoModelForCausalLM.from_pretrained`` and serving engines (vLLM,
TGI, llama.cpp's converter) expect, and nothing that needs PEFT or packlora::

    config.json, model.safetensors       base weights with W + (alpha / r) * B @ A merged in,
                                         stored in the base's own dtype
    generation_config.json               eos_token_id = the checkpoint's stop IDs
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    packlora_config.yaml                 the run's resolved config (when the checkpoint has one)
    packlora_export.json                 source checkpoint, its base and the adapter's sha256

Merging is done in float32 on the CPU, then cast back to the base's dtype. Before anything lands in
``OUT_DIR`` the merge is proven (``core.checkpoint.merge_adapter``, ``save_merged``): the merged
model's logits on a probe batch equal the adapter's within 1e-4 (fp32), and the saved model, loaded
back, holds the same tensors bit for bit; otherwise the export is refused (``MergeMismatchError``). A LoRA on
a tied ``lm_head`` (Qwen2-0.5B/1.5B tie it to ``embed_tokens``) is merged into an untied copy: the
export then holds both tensors and says ``tie_word_embeddings: false``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from packlora.core import checkpoint as ckpt_format
from packlora.core.cli import add_debug_flag, cli_entry, description
from packlora.core.errors import MissingPathError, PathError

logger = logging.getLogger(__name__)
STAGING_PREFIX = ".packlora-export-"


class OutputExistsError(PathError, FileExistsError):
    """The output directory already holds something and ``--overwrite`` was not given."""


def export_merged(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Merge the adapter of ``checkpoint`` into its base and write a standard model directory.

    Args:
        checkpoint: a packlora (or plain PEFT) LoRA checkpoint directory.
        out_dir: where to write (created; must be empty or absent unless ``overwrite``).
        overwrite: allow writing into a non-empty ``out_dir``.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        MissingPathError: ``checkpoint`` is not a LoRA checkpoint, or its base is missing.
        OutputExistsError: ``out_dir`` is not empty and ``overwrite`` is False.
        InputError: bad stop tokens in the checkpoint (``ChatFormat.stop_ids``).
        MergeMismatchError: the merged model's logits on the probe batch differ from the adapter's
            (or the saved model's from the merged one); nothing is written to ``out_dir``.
    """
    from transformers import AutoTokenizer

    from packlora.data_utils.chat_format import ChatFormat

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not ckpt_format.is_adapter(checkpoint):
        hint = " (it is already a full model: load it directly)" if ckpt_format.is_model(checkpoint) else ""
        raise MissingPathError(f"{checkpoint} has no {ckpt_format.ADAPTER_CONFIG}, so there is no adapter to merge{hint}")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out_dir} is not empty; choose a new directory or pass --overwrite")
    info = ckpt_format.CheckpointInfo.read(checkpoint)
    base = info.base_model_path()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    fmt = ChatFormat(tokenizer, **info.format_options)
    stop_ids = info.stop_ids(fmt)
    model, dtype = ckpt_format.merge_adapter(checkpoint, base)  # raises MergeMismatchError before any write
    model.generation_config = ckpt_format.generation_config(stop_ids, fmt.pad_id(stop_ids), info.max_new_tokens())
    # Written beside out_dir first and moved in once the saved model is proven, so a refused merge
    # leaves nothing that loads.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f"{STAGING_PREFIX}{out_dir.name}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        ckpt_format.save_merged(model, dtype, staging)
        tokenizer.save_pretrained(staging)
        if (checkpoint / ckpt_format.RUN_CONFIG).is_file():
            shutil.copyfile(checkpoint / ckpt_format.RUN_CONFIG, staging / ckpt_format.RUN_CONFIG)
        (staging / ckpt_format.EXPORT_MARKER).write_text(json.dumps(
            {"checkpoint": str(checkpoint.resolve()), "base_model": str(base.resolve()),
             "adapter_sha256": ckpt_format.adapter_sha256(checkpoint), "dtype": str(dtype).removeprefix("torch."),
             "stop_ids": list(stop_ids), "tie_word_embeddings": bool(model.config.tie_word_embeddings)}, indent=1))
        out_dir.mkdir(exist_ok=True)
        for f in staging.iterdir():
            os.replace(f, out_dir / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("merged %s (base %s) -> %s; stop ids %s", checkpoint, base, out_dir, fmt.format_ids(stop_ids))
    return out_dir


@cli_entry("packlora export")
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``packlora export``; 0 on success, 1 on a bad checkpoint or output directory."""
    p = argparse.ArgumentParser(prog="packlora export", description=description(__doc__))
    p.add_argument("checkpoint", help="a LoRA checkpoint directory written by packlora (or PEFT)")
    p.add_argument("--merge", required=True, metavar="OUT_DIR", help="write the merged model to OUT_DIR")
    p.add_argument("--overwrite", action="store_true", help="allow a non-empty OUT_DIR")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="packlora export: %(message)s")
    out = export_merged(args.checkpoint, args.merge, overwrite=args.overwrite)
    print(f"wrote merged model {out} (load it with AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
