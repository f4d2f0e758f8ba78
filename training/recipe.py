"""One training process as a recipe: setup -> data -> train -> save -> decode the held-out prompts.

``packlora train`` (``packlora/train.py``) parses its arguments, loads the config and runs::

    recipe = TrainingRecipe(cfg, decode_heldout=decode_file, evaluate_runaway=evaluate_runaway)
    exit_code = recipe.run()

The recipe decides everything else: the ``TrainingArguments`` (packlora's defaults, then
``training:``, then the keys packlora owns), the label-audit gate, the batch arithmetic, the model,
collator, callbacks and Trainer, and what is left behind. Decoding is handed in by the entry point
(``decode_heldout``, ``evaluate_runaway``): training imports no decoding code.

Rank 0 logs the resolved config, the data report and the batch arithmetic, audits the labels of the
first packed row, and after training decodes the held-out prompts with the checkpoint's stop IDs.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from packlora.core.config import ConfigError
from packlora.core.errors import InputError, PackloraError
from packlora.training.config import RunConfig

logger = logging.getLogger("packlora.train")
DEFAULT_MICRO_BATCH = 1
"""Rows per micro-batch (``per_device_train_batch_size`` and ``per_device_eval_batch_size``) when the
config sets none: one packed row of ``data.max_seq_length`` tokens."""


class LabelAuditError(InputError):
    """The label audit failed (``data_utils.audit.judge_labels``): training would teach the model to write
    new turns, or not to stop."""


class TrainingRecipe:
    """One process of a run of ``cfg``; ``run()`` returns the process's exit code.

    Args:
        cfg: the validated, pre-flighted run config (``training.preflight.load_and_check``).
        decode_heldout: ``decode_heldout(checkpoint, prompts_jsonl, out_jsonl) -> [reply dict]``, run on
            rank 0 after training when the run held prompts out (``decoding.decode.decode_file``).
        evaluate_runaway: ``evaluate_runaway(model, fmt=, prompts=, stop_ids=, max_new_tokens=,
            batch_size=, synced_gpus=)``, for ``runaway_eval`` (``decoding.runaway.evaluate_runaway``).
    """

    def __init__(self, cfg: RunConfig, *, decode_heldout: Callable[..., list[dict]] | None = None,
                 evaluate_runaway: Callable[..., Any] | None = None):
        self.cfg = cfg
        self.decode_heldout_fn = decode_heldout
        self.evaluate_runaway = evaluate_runaway
        self.out = Path(cfg.output_dir)

    def run(self) -> int:
        from packlora.training.run_dir import RunDirError

        self.setup()
        self.prepare_data()
        try:
            self.train()
        except RunDirError:  # every rank refuses the same resume together: leave the process group cleanly
            shutdown_process_group()
            raise
        if self.stop.stopped_at is not None:
            return self.exit_stopped()
        self.save()
        self.decode_heldout()
        return 0

    # -- the steps, in order ------------------------------------------------------------------------

    def setup(self) -> None:
        """Refuse what this machine cannot run, create ``output_dir``, build ``TrainingArguments``, find
        the checkpoint to resume from."""
        from packlora.training.checkpoint import resolve_resume
        from packlora.training.model import check_runs_here

        cfg = self.cfg
        check_runs_here(cfg.model)  # before the process group exists: a clear error, not a rank traceback
        self.out.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TENSORBOARD_LOGGING_DIR", str(self.out / "runs"))
        self.args = build_training_arguments(cfg)
        self.main_rank = self.args.process_index == 0
        self.resume = resolve_resume(self.args.resume_from_checkpoint, self.out)  # "auto" -> newest complete one
        if self.main_rank:
            self._log_start()

    def prepare_data(self) -> None:
        """Tokenizer, chat format, stop ids; tokenise and pack (global rank 0 first when every rank sees
        the same ``data.cache_dir``, else local rank 0 of each node; the others load its cache); refuse a resume
        whose settings map rows to steps differently (``check_resume_settings``); build or merge the
        base (global rank first); audit the labels; log the batch arithmetic."""
        from packlora.data_utils.cache import DEFAULT_CACHE_DIR
        from packlora.training.checkpoint import check_resume_settings, data_order
        from packlora.training.distributed import shared_by_all_ranks
        from packlora.training.data import load_run_preset, prepare_run_data, run_stop_ids
        from packlora.training.init_from import materialize_init_base
        from packlora.training.model import load_tokenizer, materialize_base

        cfg, args = self.cfg, self.args
        self.tokenizer = load_tokenizer(cfg.model)
        self.fmt = cfg.data.chat_format_for(self.tokenizer)
        preset = load_run_preset(cfg.preset)
        self.stop_ids = run_stop_ids(cfg, self.fmt, preset)
        self.pad_id = self.fmt.pad_id(self.stop_ids)
        shared = shared_by_all_ranks(cfg.data.cache_dir or DEFAULT_CACHE_DIR)  # one preparer per job, or per node
        with args.main_process_first(local=not shared, desc=f"prepare the data ({'shared' if shared else 'node-local'} "
                                     "cache)"), self._report_if_no_data():
            self.data = prepare_run_data(cfg, self.fmt, preset)
        self.data_order = data_order(args, cfg.data.max_seq_length, self.data.cache_key, cfg.seed)
        if self.resume:  # before any base is built or merged: a resume that would re-train rows is refused
            check_resume_settings(self.resume, self.data_order)
        with args.main_process_first(local=False, desc="build the base model (shared output_dir)"):
            materialize = materialize_init_base if cfg.init_from else materialize_base
            self.base_path = materialize(cfg, self.tokenizer, args, self.stop_ids, self.pad_id)
        self._audit_labels()
        self._log_batch_arithmetic()

    def train(self) -> None:
        """Model with LoRA, collator, callbacks, ``PackloraTrainer``; train (resuming when asked)."""
        from packlora.data_utils.collator import PackedCollator
        from packlora.training.backends import backend
        from packlora.training.init_from import init_adapter
        from packlora.training.model import align_special_tokens, build_model
        from packlora.training.preemption import STOP_FILE_ENV, StopRequest
        from packlora.training.run_dir import refuse_finished_resume
        from packlora.training.trainer import CheckpointExtrasCallback, PackloraTrainer, StopOnRequestCallback

        cfg, args = self.cfg, self.args
        model = build_model(self.base_path, cfg.model, cfg.lora, cfg.seed, init_adapter=init_adapter(cfg))
        in_force = align_special_tokens(model, self.tokenizer, self.stop_ids, self.pad_id)  # before the Trainer checks
        if self.main_rank:
            logger.info("%s", in_force)
        collator = PackedCollator(
            pad_token_id=self.pad_id, flash_attn_varlen=backend(cfg.model.attn_implementation).flattened_batch,
            loss_normalization=cfg.loss_normalization, isolate_segments=not self.legacy,
        )
        self.extras = CheckpointExtrasCallback(self.tokenizer, cfg.to_dict(), self.stop_ids, self.pad_id,
                                               cfg.decoding.max_new_tokens, model, data_order=self.data_order)
        self.stop = StopOnRequestCallback(StopRequest(os.environ.get(STOP_FILE_ENV) or None, args.process_index))
        callbacks = [self.extras, *refuse_finished_resume(self.resume), *self._fault_injection(), self.stop]
        if cfg.early_stopping_patience:
            from transformers import EarlyStoppingCallback

            callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
        report = self.data.report
        self.trainer = PackloraTrainer(
            model=model, args=args, train_dataset=self.data.rows, eval_dataset=self.data.eval_rows,
            data_collator=collator, processing_class=self.tokenizer, callbacks=callbacks,
            batch_digest_dir=self.out if cfg.log_batch_digests else None,
            packing_stats={"packing_efficiency": report.packing_efficiency, "rows_per_epoch": report.rows},
            lm_head_positions=cfg.model.lm_head_positions, lm_head_chunk_tokens=cfg.model.lm_head_chunk_tokens,
            loraplus_lr_ratio=cfg.lora.loraplus_lr_ratio if cfg.lora else None,
        )
        if cfg.runaway_eval.every_steps:
            self._add_runaway_eval()
        self.result = self.trainer.train(resume_from_checkpoint=self.resume)

    def save(self) -> None:
        """The final adapter (and its extras) into ``output_dir``; every rank leaves the process group."""
        trainer = self.trainer
        trainer.save_model(str(self.out))
        if trainer.is_world_process_zero():
            self.extras.finish(self.out)
            logger.info("training done: %s; %s; checkpoint %s; TensorBoard logs %s", self._pace(),
                        json.dumps(self.result.metrics), self.out.resolve(), os.environ["TENSORBOARD_LOGGING_DIR"])
        trainer.accelerator.wait_for_everyone()
        shutdown_process_group()

    def decode_heldout(self) -> None:
        """Rank 0, after training: decode the held-out prompts with the checkpoint's stop ids."""
        if not (self.main_rank and self.data.heldout and self.decode_heldout_fn):
            return
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()  # decoding runs in this process alone, without zero.Init
        out = self.out
        rows = self.decode_heldout_fn(str(out), str(out / "heldout.jsonl"), str(out / "decoded.jsonl"))
        stopped = sum(r["stop_reason"] == "stop_id" for r in rows)
        logger.info("decoded %d held-out prompts (%d stopped at a stop id) -> %s", len(rows), stopped,
                    out / "decoded.jsonl")

    def exit_stopped(self) -> int:
        """After a stop on request (``training.preemption``): ``checkpoint-N`` is complete on disk; rank 0
        acknowledges it to the batch script, every rank leaves together. No final save, no decoding:
        the run is not finished, and ``resume_from_checkpoint=auto`` continues it from that checkpoint."""
        from packlora.training.preemption import STOPPED_EXIT_CODE, acknowledge

        stop, trainer = self.stop, self.trainer
        ckpt = (self.out / f"checkpoint-{stop.stopped_at}").resolve()
        if self.main_rank:
            acknowledge(stop.request.stop_file, ckpt, stop.stopped_at)
            logger.warning(
                "stopped on request (%s) at step %d of %d: complete checkpoint %s; exit code %d. Continue with "
                "training.resume_from_checkpoint=auto (a requeued packlora Slurm job does that by itself)",
                stop.reason, stop.stopped_at, trainer.state.max_steps, ckpt, STOPPED_EXIT_CODE,
            )
        trainer.accelerator.wait_for_everyone()  # the acknowledgement exists before any rank exits
        shutdown_process_group()
        return STOPPED_EXIT_CODE

    # -- helpers ------------------------------------------------------------------------------------

    @property
    def legacy(self) -> bool:
        return self.cfg.data.labels == "legacy_full_sequence"

    def _pace(self) -> str:
        """``N steps in T s (X s/step)``: the steps this process trained (after a resume, those since the
        checkpoint) over the training loop's own wall time, start-up not counted. A step that takes
        much longer than on an idle machine means a busy machine, not a hang."""
        from packlora.training.run_dir import checkpoint_step

        steps = self.result.global_step - ((checkpoint_step(self.resume) or 0) if self.resume else 0)
        runtime = self.result.metrics.get("train_runtime", 0.0)
        return f"{steps} steps in {runtime:.0f} s ({runtime / max(steps, 1):.2f} s/step)"

    def _log_start(self) -> None:
        from packlora.training.preflight import advice

        cfg, args = self.cfg, self.args
        logger.info("resolved config:\n%s", json.dumps(cfg.to_dict(), indent=1, ensure_ascii=False))
        logger.info("rank 0 of %d; checkpoints -> %s (every %s steps); TensorBoard logs -> %s; collective "
                    "timeout %d s (training.ddp_timeout)", args.world_size, self.out.resolve(), args.save_steps,
                    os.environ["TENSORBOARD_LOGGING_DIR"], args.ddp_timeout)
        for line in advice(cfg):
            logger.warning("%s", line)
        if cfg.model.trust_remote_code:
            logger.warning("model.trust_remote_code=true: Python code shipped with %s will run in this process",
                           cfg.model.name_or_path or cfg.model.tokenizer)

    def _audit_labels(self) -> None:
        """Log the data report and the first row's trained text (rank 0); refuse labels that fail the
        audit (``judge_labels``), unless the run reproduces the bug on purpose (legacy)."""
        from packlora.data_utils.audit import judge_labels, render_row, trained_text

        report, out = self.data.report, self.out
        if self.main_rank:
            logger.info("data report: %s", json.dumps(report.to_dict(), ensure_ascii=False))
            (out / "data_report.json").write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False))
            logger.info("first packed row, trained text only:\n%s", trained_text(self.data.rows[0], self.tokenizer))
            logger.debug("first packed row:\n%s", render_row(self.data.rows[0], self.tokenizer, color=False))
            _write_heldout(out / "heldout.jsonl", self.data.heldout)
        verdict = judge_labels(report, legacy=self.legacy)
        if self.legacy and self.main_rank:
            logger.warning(
                "!!! data.labels=legacy_full_sequence: REPRODUCING THE RUNAWAY BUG ON PURPOSE. %d role-marker "
                "tokens carry a label and segments are packed without isolation; this model will learn to write "
                "new turns. Never ship it (see docs/behaviour-boundary.md) !!!", report.role_markers_in_labels,
            )
        if not verdict.may_train:
            raise LabelAuditError(
                "label audit failed: " + "; ".join(verdict.problems)
                + "; refusing to train a model that learns to write new turns or never to stop (see `packlora inspect`)"
            )

    def _log_batch_arithmetic(self) -> None:
        args, rows = self.args, self.data.report.rows
        micro, procs, accum = args.per_device_train_batch_size, args.world_size, args.gradient_accumulation_steps
        L = self.cfg.data.max_seq_length
        per_step = micro * procs * accum
        steps_per_epoch = math.ceil(rows / (micro * procs)) // accum or 1
        if self.main_rank:
            logger.info(
                "batch arithmetic: %d rows/micro-batch x %d tokens/row x %d processes x %d accumulation "
                "= %d rows = %d token slots per optimizer step; %d packed rows -> %d optimizer steps per epoch",
                micro, L, procs, accum, per_step, per_step * L, rows, steps_per_epoch,
            )
            logger.info("%s", self._memory_estimate(micro).describe())

    def _memory_estimate(self, micro: int):
        """The logits and activations one micro-batch needs on each rank (``training/memory.py``)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.base_path, trust_remote_code=self.cfg.model.trust_remote_code)
        return run_memory_estimate(self.cfg, config, micro)

    def _fault_injection(self) -> list:
        from packlora.training import distributed

        return distributed.fault_injection_callbacks()

    def _add_runaway_eval(self) -> None:
        from functools import partial

        from packlora.training.runaway_callback import RunawayEvalCallback, heldout_prompts

        if self.evaluate_runaway is None:
            raise InputError("runaway_eval.every_steps is set but this entry point has no runaway evaluator; "
                             "run training with `packlora train` (or `packlora launch`)")
        cfg = self.cfg
        prompts = heldout_prompts(self.data.heldout, cfg.runaway_eval.num_prompts)
        evaluate = partial(self.evaluate_runaway, fmt=self.fmt, prompts=prompts, stop_ids=self.stop_ids,
                           max_new_tokens=cfg.runaway_eval.max_new_tokens, batch_size=len(prompts))
        self.trainer.add_callback(RunawayEvalCallback(evaluate, cfg.runaway_eval.every_steps, self.out).attach(self.trainer))

    @contextlib.contextmanager
    def _report_if_no_data(self):
        """Write ``data_report.json`` (rank 0) also when every example was dropped, then re-raise."""
        from packlora.data_utils.dataset import NoExampleError

        try:
            yield
        except NoExampleError as e:
            if self.main_rank:
                (self.out / "data_report.json").write_text(json.dumps(e.report, indent=1, ensure_ascii=False))
            raise


def run_memory_estimate(cfg: RunConfig, model_config: Any, micro_batch: int):
    """``training.memory.estimate_memory`` for this run: its rows, dtype, attention backend, LoRA and
    LM head (``model.lm_head_positions``, ``model.lm_head_chunk_tokens``); what rank 0 logs at start-up.

    Args:
        model_config: the base model's ``transformers`` config (``vocab_size``, the layer shape).
        micro_batch: rows per micro-batch (``per_device_train_batch_size``).
    """
    from packlora.training.memory import estimate_memory
    from packlora.training.model import resolve_dtype

    return estimate_memory(model_config, micro_batch=micro_batch, max_seq_length=cfg.data.max_seq_length,
                           dtype_bytes=resolve_dtype(cfg.model.dtype).itemsize,
                           attn_implementation=cfg.model.attn_implementation, lora=cfg.lora,
                           lm_head_positions=cfg.model.lm_head_positions,
                           lm_head_chunk_tokens=cfg.model.lm_head_chunk_tokens)


def build_training_arguments(cfg: RunConfig):
    """``TrainingArguments`` from the config: packlora's defaults (one row per micro-batch, TensorBoard,
    a log line per step, a checkpoint every 500 steps), then ``training:``, then the keys packlora owns
    (output_dir, deepspeed, seed, precision, remove_unused_columns). Has no side effects (no process
    group, no directory): ``packlora launch`` builds it once to check the values before any process starts.

    bf16 on CPU: ``model.dtype: bfloat16`` sets ``bf16=True`` (DeepSpeed's ``bf16`` section and its
    bf16 ZeRO optimizer) also without CUDA, so CI runs the bf16 paths. See ``bf16_on_cpu``.

    Raises:
        ConfigError: transformers refuses a value (its message, on one line).
    """
    import torch
    from transformers import TrainingArguments

    from packlora.training.model import resolve_dtype
    from packlora.training.preflight import deepspeed_path

    dtype = resolve_dtype(cfg.model.dtype)
    # One packed row per micro-batch unless the config says otherwise: a row already holds
    # max_seq_length tokens, and transformers' default of 8 rows multiplies the activations' memory
    # (and, with model.lm_head_positions: all, the logits') by 8 (``training/memory.py``); raise
    # gradient_accumulation_steps for a larger optimizer step.
    kwargs = dict(report_to=["tensorboard"], logging_steps=1, save_strategy="steps", save_steps=500,
                  per_device_train_batch_size=DEFAULT_MICRO_BATCH, per_device_eval_batch_size=DEFAULT_MICRO_BATCH)
    if cfg.data.eval or cfg.data.eval_split is not None:  # an evaluation set: evaluate as often as we save
        kwargs.update(eval_strategy="steps", eval_steps=cfg.training.get("save_steps", 500),
                      per_device_eval_batch_size=cfg.training.get("per_device_train_batch_size", DEFAULT_MICRO_BATCH))
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
    with bf16_on_cpu(dtype == torch.bfloat16 and not torch.cuda.is_available()):
        try:
            return TrainingArguments(**kwargs)
        except ValueError as e:  # transformers' own rules on the values (strategies, schedulers, precision)
            if isinstance(e, PackloraError):
                raise
            reason = "; ".join(line.strip("- ").strip() for line in str(e).splitlines() if line.strip())
            raise ConfigError([f"training: transformers.TrainingArguments refuses these settings: {reason}"],
                              "the run config") from None


@contextlib.contextmanager
def bf16_on_cpu(active: bool):
    """Let ``TrainingArguments(bf16=True)`` through on a machine without CUDA.

    transformers 5.24 refuses bf16 unless ``is_torch_bf16_gpu_available()`` ("Your setup doesn't
    support bf16/gpu"), a GPU capability check. On CPU, torch computes in bf16 and DeepSpeed 0.19's
    CPU accelerator runs its bf16 ZeRO-2/3 optimizer over gloo (2-process runs train, save, reload,
    decode and merge: ``tests/distributed/test_bf16_cpu.py``). transformers' own way round, ``use_cpu=True``,
    bypasses DeepSpeed's process group set-up: ZeRO-3's ``zero.Init`` then sees world size 1 and stops
    (``train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size 2 != 1 * 1 * 1``).
    So only the check is answered, only while the arguments are built, only without CUDA (a GPU without
    bf16 is still refused).
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


def shutdown_process_group() -> None:
    """Every rank tears the process group down explicitly, together: left to interpreter exit,
    gloo's threads were destroyed mid-flight on 2 CPU ranks (``terminate called without an active
    exception``, exit -6) after a successful run."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _write_heldout(path: Path, heldout) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in heldout:
            f.write(json.dumps({"messages": r.as_dicts(), "source": str(r.source)}, ensure_ascii=False) + "\n")
