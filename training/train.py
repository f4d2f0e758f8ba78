"""One training process: config -> data -> model -> Trainer (DeepSpeed) -> checkpoint -> decode.

Started once per process by ``packlora launch`` (deepspeed or torchrun); by hand::

    deepspeed --num_accelerators 2 --no_local_rank --module training.train configs/shishuo_tiny.yaml

Rank 0 logs the resolved config, the data report and the batch arithmetic, audits the labels of
the first packed row, and after training decodes the held-out prompts with the checkpoint's stop IDs.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from pathlib import Path

from training import distributed

logger = logging.getLogger("packlora.train")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="packlora train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ns = parser.parse_args(argv)
    _setup_logging()
    distributed.configure()  # before TrainingArguments initialises the process group

    from training.config import load_config

    cfg = load_config(ns.config, ns.overrides)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "runs"))
    args = build_training_arguments(cfg)
    main_rank = args.process_index == 0
    if main_rank:
        logger.info("resolved config:\n%s", json.dumps(cfg.to_dict(), indent=1, ensure_ascii=False))

    from data_utils.audit import render_row, trained_text
    from data_utils.collator import PackedCollator
    from data_utils.dataset import prepare_data
    from training.checkpoint import stop_token_ids
    from training.model import build_model, load_tokenizer, materialize_base

    tokenizer = load_tokenizer(cfg.model)
    stop_ids = stop_token_ids(tokenizer, cfg.decoding.stop_tokens)
    with args.main_process_first(local=True, desc="tokenise and pack (node-local cache)"):
        data = prepare_data(
            cfg.data.train, tokenizer, max_seq_length=cfg.data.max_seq_length, format=cfg.data.format,
            overflow=cfg.data.overflow, eval_holdout=cfg.data.eval_holdout, seed=cfg.seed, cache_dir=cfg.data.cache_dir,
        )
    with args.main_process_first(local=False, desc="build the base model (shared output_dir)"):
        base_path = materialize_base(cfg, tokenizer, args)
    report = data.report
    if main_rank:
        logger.info("data report: %s", json.dumps(report.to_dict(), ensure_ascii=False))
        (out / "data_report.json").write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False))
        logger.info("first packed row, trained text only:\n%s", trained_text(data.rows[0], tokenizer))
        logger.debug("first packed row:\n%s", render_row(data.rows[0], tokenizer, color=False))
        _write_heldout(out / "heldout.jsonl", data.heldout)
    if report.role_markers_in_labels:
        raise RuntimeError(
            f"label audit failed: {report.role_markers_in_labels} role-marker tokens carry a label; "
            "refusing to train a model that learns to write new turns (see `packlora inspect`)"
        )
    _log_batch_arithmetic(args, cfg, report.rows, main_rank)

    model = build_model(base_path, cfg.model, cfg.lora, cfg.seed)
    from training.trainer import CheckpointExtrasCallback, PackloraTrainer

    collator = PackedCollator(
        pad_token_id=tokenizer.pad_token_id, flash_attn_varlen=cfg.model.attn_implementation == "flash_attention_2"
    )
    extras = CheckpointExtrasCallback(tokenizer, cfg.to_dict(), stop_ids, cfg.decoding.max_new_tokens, model)
    trainer = PackloraTrainer(
        model=model, args=args, train_dataset=data.rows, data_collator=collator, processing_class=tokenizer,
        callbacks=[extras], batch_digest_dir=out if cfg.log_batch_digests else None,
    )
    result = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        extras.finish(out)
        logger.info("training done: %s; checkpoint %s; TensorBoard logs %s",
                    json.dumps(result.metrics), out.resolve(), os.environ["TENSORBOARD_LOGGING_DIR"])
    trainer.accelerator.wait_for_everyone()
    if main_rank and data.heldout:
        _decode_heldout(out)
    return 0


def build_training_arguments(cfg):
    """``TrainingArguments`` from the config: packlora's defaults, then ``training:``, then the keys
    packlora owns (output_dir, deepspeed, seed, precision, remove_unused_columns)."""
    import torch
    from transformers import TrainingArguments

    from training.model import resolve_dtype

    dtype = resolve_dtype(cfg.model.dtype)
    kwargs = dict(report_to=["tensorboard"], logging_steps=1, save_strategy="steps", save_steps=500)
    kwargs.update(cfg.training)
    kwargs.update(
        output_dir=cfg.output_dir,
        deepspeed=cfg.deepspeed_path(),
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        remove_unused_columns=False,
    )
    return TrainingArguments(**kwargs)


def _log_batch_arithmetic(args, cfg, rows: int, main_rank: bool) -> None:
    micro, procs, accum = args.per_device_train_batch_size, args.world_size, args.gradient_accumulation_steps
    L = cfg.data.max_seq_length
    per_step = micro * procs * accum
    steps_per_epoch = math.ceil(rows / (micro * procs)) // accum or 1
    if main_rank:
        logger.info(
            "batch arithmetic: %d rows/micro-batch x %d tokens/row x %d processes x %d accumulation "
            "= %d rows = %d token slots per optimizer step; %d packed rows -> %d optimizer steps per epoch",
            micro, L, procs, accum, per_step, per_step * L, rows, steps_per_epoch,
        )


def _write_heldout(path: Path, heldout) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in heldout:
            f.write(json.dumps({"messages": r.as_dicts(), "source": str(r.source)}, ensure_ascii=False) + "\n")


def _decode_heldout(out: Path) -> None:
    import torch.distributed as dist
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from decoding.cli import decode_file

    unset_hf_deepspeed_config()  # decoding runs in this process alone, without zero.Init
    if dist.is_initialized():
        dist.destroy_process_group()
    rows = decode_file(str(out), str(out / "heldout.jsonl"), str(out / "decoded.jsonl"))
    stopped = sum(r["stop_reason"] == "stop_id" for r in rows)
    logger.info("decoded %d held-out prompts (%d stopped at a stop id) -> %s", len(rows), stopped, out / "decoded.jsonl")


def _setup_logging() -> None:
    rank = distributed.rank()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )


if __name__ == "__main__":
    sys.exit(main())
