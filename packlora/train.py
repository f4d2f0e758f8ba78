"""One training process: config -> data -> model -> Trainer (DeepSpeed) -> checkpoint -> decode.

Started once per process by ``packlora launch`` (deepspeed or torchrun); by hand::

    deepspeed --num_accelerators 2 --no_local_rank --module packlora.train configs/shishuo_tiny.yaml

Rank 0 logs the resolved config, the data report and the batch arithmetic, audits the labels of
the first packed row, and after training decodes the held-out prompts with the checkpoint's stop IDs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from pathlib import Path

from packlora.core.cli import cli_entry
from packlora.training import distributed

logger = logging.getLogger("packlora.train")


@cli_entry("packlora train")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="packlora train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    ns = parser.parse_intermixed_args(argv)  # overrides before or after the flags
    _quiet_known_noise()  # before configure imports DeepSpeed
    distributed.configure()  # before TrainingArguments initialises the process group; sets RANK under srun
    _setup_logging()  # after configure: the rank in every log line is this process's own
    _log_place()

    from packlora.data_utils.collator import PackedCollator
    from packlora.training.checkpoint import resolve_resume
    from packlora.training.data import load_run_preset, prepare_run_data, run_stop_ids
    from packlora.training.init_from import init_adapter, materialize_init_base
    from packlora.training.model import build_model, check_runs_here, load_tokenizer, materialize_base
    from packlora.training.preemption import STOP_FILE_ENV, StopRequest
    from packlora.training.preflight import load_and_check
    from packlora.training.trainer import CheckpointExtrasCallback, PackloraTrainer, StopOnRequestCallback
    from packlora.training.backends import backend

    cfg = load_and_check(ns.config, ns.overrides)
    check_runs_here(cfg.model)  # before the process group exists: a clear error, not a rank traceback
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(out / "runs"))
    args = build_training_arguments(cfg)
    main_rank = args.process_index == 0
    resume = resolve_resume(args.resume_from_checkpoint, out)  # "auto" -> newest complete checkpoint-N
    if main_rank:
        _log_start(cfg, args, out)

    tokenizer = load_tokenizer(cfg.model)
    fmt = cfg.data.chat_format_for(tokenizer)
    preset = load_run_preset(cfg.preset)
    stop_ids = run_stop_ids(cfg, fmt, preset)
    pad_id = fmt.pad_id(stop_ids)
    with args.main_process_first(local=True, desc="tokenise and pack (node-local cache)"), _report_if_no_data(out, main_rank):
        data = prepare_run_data(cfg, fmt, preset)
    with args.main_process_first(local=False, desc="build the base model (shared output_dir)"):
        materialize = materialize_init_base if cfg.init_from else materialize_base
        base_path = materialize(cfg, tokenizer, args, stop_ids, pad_id)
    legacy = cfg.data.labels == "legacy_full_sequence"
    _audit_labels(data, tokenizer, out, legacy, main_rank)
    _log_batch_arithmetic(args, cfg, data.report.rows, main_rank)

    model = build_model(base_path, cfg.model, cfg.lora, cfg.seed, init_adapter=init_adapter(cfg))
    collator = PackedCollator(
        pad_token_id=pad_id, flash_attn_varlen=backend(cfg.model.attn_implementation).flattened_batch,
        loss_normalization=cfg.loss_normalization, isolate_segments=not legacy,
    )
    extras = CheckpointExtrasCallback(tokenizer, cfg.to_dict(), stop_ids, pad_id, cfg.decoding.max_new_tokens, model)
    stop = StopOnRequestCallback(StopRequest(os.environ.get(STOP_FILE_ENV) or None, args.process_index))
    callbacks = [extras, *distributed.fault_injection_callbacks(), stop]
    if cfg.early_stopping_patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = PackloraTrainer(
        model=model, args=args, train_dataset=data.rows, eval_dataset=data.eval_rows, data_collator=collator,
        processing_class=tokenizer, callbacks=callbacks, batch_digest_dir=out if cfg.log_batch_digests else None,
        packing_stats={"packing_efficiency": data.report.packing_efficiency, "rows_per_epoch": data.report.rows},
    )
    if cfg.runaway_eval.every_steps:
        _add_runaway_eval(trainer, cfg, fmt, data, stop_ids, out)

    result = trainer.train(resume_from_checkpoint=resume)
    if stop.stopped_at is not None:
        return _exit_stopped(trainer, stop, out, main_rank)
    trainer.save_model(str(out))
    if trainer.is_world_process_zero():
        extras.finish(out)
        logger.info("training done: %s; checkpoint %s; TensorBoard logs %s",
                    json.dumps(result.metrics), out.resolve(), os.environ["TENSORBOARD_LOGGING_DIR"])
    trainer.accelerator.wait_for_everyone()
    _shutdown_process_group()
    if main_rank and data.heldout:
        _decode_heldout(out)
    return 0


def _exit_stopped(trainer, stop, out: Path, main_rank: bool) -> int:
    """After a stop on request (``training.preemption``): ``checkpoint-N`` is complete on disk; rank 0
    acknowledges it to the batch script, every rank leaves together. No final save, no decoding:
    the run is not finished, and ``resume_from_checkpoint=auto`` continues it from that checkpoint."""
    from packlora.training.preemption import STOPPED_EXIT_CODE, acknowledge

    ckpt = (out / f"checkpoint-{stop.stopped_at}").resolve()
    if main_rank:
        acknowledge(stop.request.stop_file, ckpt, stop.stopped_at)
        logger.warning(
            "stopped on request (%s) at step %d of %d: complete checkpoint %s; exit code %d. Continue with "
            "training.resume_from_checkpoint=auto (a requeued packlora Slurm job does that by itself)",
            stop.reason, stop.stopped_at, trainer.state.max_steps, ckpt, STOPPED_EXIT_CODE,
        )
    trainer.accelerator.wait_for_everyone()  # the acknowledgement exists before any rank exits
    _shutdown_process_group()
    return STOPPED_EXIT_CODE


def _shutdown_process_group() -> None:
    """Every rank tears the process group down explicitly, together: left to interpreter exit,
    gloo's threads were destroyed mid-flight on 2 CPU ranks (``terminate called without an active
    exception``, exit -6) after a successful run."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _log_place() -> None:
    """Every rank, one line: where it runs and the CPUs it may use (a starved rank shows here)."""
    place = logging.getLogger("packlora.place")
    place.setLevel(logging.INFO)  # on every rank, not only rank 0
    place.info("%s", distributed.describe_place(os.environ))


def _log_start(cfg, args, out: Path) -> None:
    logger.info("resolved config:\n%s", json.dumps(cfg.to_dict(), indent=1, ensure_ascii=False))
    logger.info("rank 0 of %d; checkpoints -> %s (every %s steps); TensorBoard logs -> %s; collective "
                "timeout %d s (training.ddp_timeout)", args.world_size, out.resolve(), args.save_steps,
                os.environ["TENSORBOARD_LOGGING_DIR"], args.ddp_timeout)
    from packlora.training.preflight import advice

    for line in advice(cfg):
        logger.warning("%s", line)
    if cfg.model.trust_remote_code:
        logger.warning("model.trust_remote_code=true: Python code shipped with %s will run in this process",
                       cfg.model.name_or_path or cfg.model.tokenizer)


def _audit_labels(data, tokenizer, out: Path, legacy: bool, main_rank: bool) -> None:
    """Log the data report and the first row's trained text (rank 0); refuse role markers in labels
    unless the run reproduces the bug on purpose (``data.labels: legacy_full_sequence``)."""
    from packlora.data_utils.audit import render_row, trained_text

    report = data.report
    if main_rank:
        logger.info("data report: %s", json.dumps(report.to_dict(), ensure_ascii=False))
        (out / "data_report.json").write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False))
        logger.info("first packed row, trained text only:\n%s", trained_text(data.rows[0], tokenizer))
        logger.debug("first packed row:\n%s", render_row(data.rows[0], tokenizer, color=False))
        _write_heldout(out / "heldout.jsonl", data.heldout)
    if legacy and main_rank:
        logger.warning(
            "!!! data.labels=legacy_full_sequence: REPRODUCING THE RUNAWAY BUG ON PURPOSE. %d role-marker "
            "tokens carry a label and segments are packed without isolation; this model will learn to write "
            "new turns. Never ship it (see docs/behaviour-boundary.md) !!!", report.role_markers_in_labels,
        )
    if (report.role_markers_in_labels or report.control_tokens_in_labels) and not legacy:
        raise RuntimeError(
            f"label audit failed: {report.role_markers_in_labels} role-marker and {report.control_tokens_in_labels} "
            "other control tokens carry a label; "
            "refusing to train a model that learns to write new turns (see `packlora inspect`)"
        )


def _add_runaway_eval(trainer, cfg, fmt, data, stop_ids, out: Path) -> None:
    from functools import partial

    from packlora.decoding.runaway import evaluate_runaway
    from packlora.training.runaway_callback import RunawayEvalCallback, heldout_prompts

    prompts = heldout_prompts(data.heldout, cfg.runaway_eval.num_prompts)
    evaluate = partial(evaluate_runaway, fmt=fmt, prompts=prompts, stop_ids=stop_ids,
                       max_new_tokens=cfg.runaway_eval.max_new_tokens, batch_size=len(prompts))
    trainer.add_callback(RunawayEvalCallback(evaluate, cfg.runaway_eval.every_steps, out).attach(trainer))


def build_training_arguments(cfg):
    """``TrainingArguments`` from the config: packlora's defaults, then ``training:``, then the keys
    packlora owns (output_dir, deepspeed, seed, precision, remove_unused_columns).

    bf16 on CPU: ``model.dtype: bfloat16`` sets ``bf16=True`` (DeepSpeed's ``bf16`` section and its
    bf16 ZeRO optimizer) also without CUDA, so CI runs the bf16 paths. See ``_bf16_on_cpu``."""
    import torch
    from transformers import TrainingArguments

    from packlora.training.model import resolve_dtype
    from packlora.training.preflight import deepspeed_path

    dtype = resolve_dtype(cfg.model.dtype)
    kwargs = dict(report_to=["tensorboard"], logging_steps=1, save_strategy="steps", save_steps=500)
    if cfg.data.eval or cfg.data.eval_split is not None:  # an evaluation set: evaluate as often as we save
        kwargs.update(eval_strategy="steps", eval_steps=cfg.training.get("save_steps", 500),
                      per_device_eval_batch_size=cfg.training.get("per_device_train_batch_size", 8))
    if cfg.early_stopping_patience:
        kwargs.update(load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=False)
    kwargs.update(cfg.training)
    kwargs.update(
        output_dir=cfg.output_dir,
        deepspeed=deepspeed_path(cfg),
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        remove_unused_columns=False,
    )
    with _bf16_on_cpu(dtype == torch.bfloat16 and not torch.cuda.is_available()):
        return TrainingArguments(**kwargs)


@contextlib.contextmanager
def _bf16_on_cpu(active: bool):
    """Let ``TrainingArguments(bf16=True)`` through on a machine without CUDA.

    transformers 5.24 refuses bf16 unless ``is_torch_bf16_gpu_available()`` ("Your setup doesn't
    support bf16/gpu"), a GPU capability check. On CPU, torch computes in bf16 and DeepSpeed 0.19's
    CPU accelerator runs its bf16 ZeRO-2/3 optimizer over gloo (2-process runs train, save, reload,
    decode and merge: ``tests/distributed/test_bf16_cpu.py``). transformers' own way round, ``use_cpu=True``, bypasses DeepSpeed's process
    group set-up: ZeRO-3's ``zero.Init`` then sees world size 1 and stops (``train_batch_size is not
    equal to micro_batch_per_gpu * gradient_acc_step * world_size 2 != 1 * 1 * 1``). So only the check
    is answered, only while the arguments are built, only without CUDA (a GPU without bf16 is still refused).
    """
    if not active:
        yield
        return
    import transformers.training_args as training_args

    original = training_args.is_torch_bf16_gpu_available
    training_args.is_torch_bf16_gpu_available = lambda: True
    try:
        yield
    finally:
        training_args.is_torch_bf16_gpu_available = original


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
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from packlora.decoding.decode import decode_file

    unset_hf_deepspeed_config()  # decoding runs in this process alone, without zero.Init
    rows = decode_file(str(out), str(out / "heldout.jsonl"), str(out / "decoded.jsonl"))
    stopped = sum(r["stop_reason"] == "stop_id" for r in rows)
    logger.info("decoded %d held-out prompts (%d stopped at a stop id) -> %s", len(rows), stopped, out / "decoded.jsonl")


@contextlib.contextmanager
def _report_if_no_data(out: Path, main_rank: bool):
    """Write ``data_report.json`` (rank 0) also when every example was dropped, then re-raise."""
    from packlora.data_utils.dataset import NoExampleError

    try:
        yield
    except NoExampleError as e:
        if main_rank:
            (out / "data_report.json").write_text(json.dumps(e.report, indent=1, ensure_ascii=False))
        raise


def _setup_logging() -> None:
    rank = distributed.rank()
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[%(asctime)s rank{rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stdout,
    )


# Messages every run printed that say nothing about this run (transformers 5.24, torch 2.13,
# accelerate 1.15, DeepSpeed 0.19): deprecations inside the libraries, a C-compiler probe that
# DeepSpeed's op builder logs at INFO, and accelerate's "Gradient accumulation steps mismatch" (its
# own plugin says 1, DeepSpeed's config has training.gradient_accumulation_steps, and it takes
# DeepSpeed's, which is right; the batch arithmetic line states the value).
_NOISE = (r"`is_gradient_checkpointing` is deprecated", r"`torch\.distributed\.\w+` is deprecated",
          r"'pin_memory' argument is set as true but no accelerator is found")


def _quiet_known_noise() -> None:
    import warnings

    for message in _NOISE:
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("compilers.C.base").setLevel(logging.WARNING)
    logging.getLogger("accelerate.accelerator").addFilter(
        lambda record: "Gradient accumulation steps mismatch" not in record.getMessage())


if __name__ == "__main__":
    sys.exit(main())
