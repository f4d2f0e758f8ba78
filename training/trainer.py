"""``transformers.Trainer`` plus atomic checkpoints with packlora's extras, and an optional per-rank batch log."""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import EvalLoopOutput

from packlora.core.checkpoint import DATA_ORDER, TRAINER_STATE, verify_adapter, write_extras
from packlora.core.errors import InputError
from packlora.training.checkpoint import TMP_PREFIX, commit_checkpoint, rotate_checkpoints
from packlora.training.lm_head import LM_HEAD_POSITIONS, prepare_head_for_zero3, supervised_token_ce
from packlora.training.loss import LossNormalizationMixin, row_loss_stats, token_row_loss_stats
from packlora.training.model import lora_shapes

logger = logging.getLogger(__name__)


class CheckpointExtrasCallback(TrainerCallback):
    """Holds what ``finish`` writes next to every adapter: tokenizer, stop IDs, resolved config and
    (when given) the data order a resume checks, then it verifies the adapter holds every trained
    tensor at full shape. A PiSSA/OLoRA adapter is first converted to the plain LoRA that gives the
    same model on the original base (``training.lora_variants``). ``PackloraTrainer`` calls ``finish``
    on rank 0 inside each atomic save, before the checkpoint becomes visible.

    Build it from the model before the Trainer (DeepSpeed) partitions the new LoRA tensors: it
    keeps their full shapes and, for PiSSA/OLoRA, their initial values."""

    def __init__(self, tokenizer, config: dict, stop_ids: list[int], pad_id: int, max_new_tokens: int, model,
                 data_order: dict | None = None):
        from packlora.training.lora_variants import converted_shapes, initial_adapter, mutates_base

        self.tokenizer, self.config, self.stop_ids, self.pad_id = tokenizer, config, stop_ids, pad_id
        self.max_new_tokens = max_new_tokens
        self.data_order = data_order  # training.checkpoint.data_order: what a resume checks
        self.expected = lora_shapes(model)
        peft_config = getattr(model, "peft_config", {}).get("default")
        self.initial = None
        if peft_config is not None and mutates_base(peft_config.init_lora_weights):
            self.initial = initial_adapter(model)  # A0, B0: the conversion subtracts them
            self.expected = converted_shapes(self.expected)

    def finish(self, ckpt_dir: Path) -> None:
        from packlora.training.lora_variants import convert_to_plain_lora

        write_extras(ckpt_dir, self.tokenizer, self.config, self.stop_ids, self.pad_id, self.max_new_tokens)
        if self.data_order is not None:
            (Path(ckpt_dir) / DATA_ORDER).write_text(json.dumps(self.data_order, indent=1) + "\n")
        if not self.expected:  # full-parameter training (lora: null): no adapter to verify
            logger.info("checkpoint %s: full model, stop ids %s", ckpt_dir, self.stop_ids)
            return
        if self.initial is not None:
            convert_to_plain_lora(ckpt_dir, self.initial)
        n = verify_adapter(ckpt_dir, self.expected)
        logger.info("checkpoint %s: %d adapter tensors at full shape%s, stop ids %s", ckpt_dir, n,
                    " (PiSSA/OLoRA saved as a plain LoRA of rank 2r on the original base)" if self.initial else "",
                    self.stop_ids)


class StopOnRequestCallback(TrainerCallback):
    """Stop every rank at the same step boundary, with a checkpoint, once any rank is asked to
    (``training.preemption.StopRequest``: SIGUSR1, or the stop file on rank 0).

    After every optimizer step all ranks all-reduce (max) one int32 on ``args.device``, then set
    ``should_save`` and ``should_training_stop`` together; the Trainer saves ``checkpoint-N`` right
    after this callback and leaves its loop. A request at the last step changes nothing.

    Attributes:
        stopped_at: the step the run stopped at on request (its checkpoint is complete once
            ``Trainer.train`` returns), or None.
        reason: what asked, for the log (``"SIGUSR1"``, ``"stop file ..."``, ``"another rank's request"``).
    """

    def __init__(self, request):
        self.request = request
        self.stopped_at: int | None = None
        self.reason = ""

    def on_train_begin(self, args, state, control, **kwargs):
        self.request.install()

    def on_train_end(self, args, state, control, **kwargs):
        self.request.uninstall()

    def on_step_end(self, args, state, control, **kwargs):
        reason = self.request.reason()
        flag = torch.tensor([1 if reason else 0], dtype=torch.int32, device=args.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if not int(flag.item()) or state.global_step >= state.max_steps:
            return control  # not asked, or the last step anyway: finish normally
        self.stopped_at, self.reason = state.global_step, reason or "another rank's request"
        control.should_save = control.should_training_stop = True
        if state.is_world_process_zero:
            logger.warning("stop requested (%s): saving checkpoint-%d, then stopping", self.reason, state.global_step)
        return control


class PackloraTrainer(LossNormalizationMixin, Trainer):
    """Trainer with atomic checkpoints (see ``training.checkpoint``) that can log a digest of each
    batch per rank (``log_batch_digests: true``).

    A save of step N: rank 0 clears leftover ``output_dir/tmp-checkpoint-*`` dirs; every rank writes
    its part (adapter, ``global_stepN/`` DeepSpeed shards, RNG state...) through the stock
    ``Trainer._save_checkpoint`` into ``tmp-checkpoint-N/checkpoint-N``; after a barrier rank 0
    writes the extras, verifies the adapter, marks it complete, renames it to
    ``output_dir/checkpoint-N`` and rotates old checkpoints under ``save_total_limit`` (never the
    newest, nor the best; transformers' own end-of-training cleanup, which may delete the newest, is
    skipped: ``_finalize_training``).

    Evaluation (``data.eval`` / ``data.eval_split``) runs on packed, isolated rows like training, on
    every rank, and reports ``eval_loss`` normalised like the training loss over the whole set
    (``prediction_step``); TensorBoard shows it as ``eval/loss``.

    ``lm_head_positions`` (``model.lm_head_positions``): ``"supervised"`` (default) projects and
    scores only the positions whose next label trains, in chunks of ``lm_head_chunk_tokens``
    (``training/lm_head.py``), in training and evaluation alike; ``"all"`` builds the full logits.
    """

    def __init__(self, *args, batch_digest_dir: Path | None = None, packing_stats: dict | None = None,
                 lm_head_positions: str = "supervised", lm_head_chunk_tokens: int | None = None,
                 loraplus_lr_ratio: float | None = None, **kwargs):
        if lm_head_positions not in LM_HEAD_POSITIONS:
            raise InputError(f"model.lm_head_positions: {lm_head_positions!r} is not one of {list(LM_HEAD_POSITIONS)}")
        self.lm_head_positions, self.lm_head_chunk_tokens = lm_head_positions, lm_head_chunk_tokens
        super().__init__(*args, **kwargs)
        self._loraplus_lr_ratio = loraplus_lr_ratio
        if lm_head_positions == "supervised":
            prepare_head_for_zero3(self.model)  # before the DeepSpeed engine is built (in train/evaluate)
        self._packing_stats = dict(packing_stats or {})  # constant figures logged with every loss
        self._tokens = [0, 0]  # supervised labels, label slots since the last log (this rank)
        self._last_log_time = None
        self._digest_file = None
        self._eval_sums = None
        if batch_digest_dir is not None:
            self._digest_file = Path(batch_digest_dir) / f"batches.rank{self.args.process_index}.jsonl"

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, or with ``lora.loraplus_lr_ratio`` PEFT's LoRA+ optimizer of the same
        class and settings (``training.lora_variants.create_loraplus_optimizer``). DeepSpeed calls this
        too when its JSON has no ``optimizer`` section (preflight refuses LoRA+ with one)."""
        if self._loraplus_lr_ratio is None or self.optimizer is not None:
            return super().create_optimizer(model)
        from packlora.training.lora_variants import create_loraplus_optimizer

        opt_model = self.model if model is None else model
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = create_loraplus_optimizer(opt_model, self.args, self._loraplus_lr_ratio, optimizer_cls,
                                                   optimizer_kwargs)
        return self.optimizer

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being written, point the stock save at the staging directory.
        staging = getattr(self, "_packlora_staging", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        step = self.state.global_step
        staging = run_dir / f"{TMP_PREFIX}-{step}"
        if self.args.should_save:
            for stale in run_dir.glob(f"{TMP_PREFIX}-*"):  # left by a save cut short (any step)
                shutil.rmtree(stale, ignore_errors=True)
            staging.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        self._packlora_staging = str(staging)
        try:
            super()._save_checkpoint(model, trial)  # rotation inside sees only the staging dir
        finally:
            self._packlora_staging = None
        self.accelerator.wait_for_everyone()  # every rank's shards are written
        written, final = staging / f"checkpoint-{step}", run_dir / f"checkpoint-{step}"
        best_moved = bool(self.state.best_model_checkpoint) and Path(self.state.best_model_checkpoint) == written
        if best_moved:  # every rank: all of them load the best checkpoint at the end
            self.state.best_model_checkpoint = str(final)
        if self.args.should_save:
            if best_moved:  # the saved state names the checkpoint's final place too (a resume reads it)
                self.state.save_to_json(str(written / TRAINER_STATE))
            extras = next((c for c in self.callback_handler.callbacks if isinstance(c, CheckpointExtrasCallback)), None)
            if extras is not None:
                extras.finish(written)  # raises IncompleteAdapterError before anything becomes visible
            commit_checkpoint(written, final, step)
            staging.rmdir()
            rotate_checkpoints(run_dir, self.args.save_total_limit, keep=(self.state.best_model_checkpoint,))
        self.accelerator.wait_for_everyone()

    def _finalize_training(self, trial, num_train_samples, start_time):
        """The stock end of training, less its extra cleanup: with ``save_total_limit: 1`` and a best
        checkpoint (``load_best_model_at_end``) it deletes every checkpoint but the best, the newest
        included, after early stopping (transformers #35070), so nothing is left to resume from.
        Rotation here already kept the newest and the best at every save (``rotate_checkpoints``)."""
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # the stock cleanup runs only when it is exactly 1
        try:
            return super()._finalize_training(trial, num_train_samples, start_time)
        finally:
            self.args.save_total_limit = limit

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: gather each row's loss numerator and denominator (``training.loss.row_loss_stats``)
        from every rank, the duplicates that even out the ranks' batches dropped; ``evaluation_loop``
        turns the sums into ``eval_loss``, normalised exactly like the training loss."""
        inputs = self._prepare_inputs(inputs)
        weights = inputs.pop("loss_weights", None)
        labels = inputs.pop("labels")
        with torch.no_grad():
            if self.lm_head_positions == "supervised":
                ce, keep, _ = supervised_token_ce(model, {**inputs, "use_cache": False}, labels, self.lm_head_chunk_tokens)
                stats = token_row_loss_stats(ce, keep, weights)
            else:
                stats = row_loss_stats(model(**inputs, use_cache=False).logits, labels, weights)
        stats = self.accelerator.gather_for_metrics(stats)
        self._eval_sums = stats.sum(0) + (self._eval_sums if self._eval_sums is not None else 0)
        return None, None, None

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        self._eval_sums = None
        out = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        metrics = dict(out.metrics)
        if self._eval_sums is not None and float(self._eval_sums[1]) > 0:
            num, den = (float(x) for x in self._eval_sums)
            metrics[f"{metric_key_prefix}_loss"] = num / den
            metrics[f"{metric_key_prefix}_loss_denominator"] = den  # trained tokens (per_token) or examples
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=out.num_samples)

    def training_step(self, model, inputs, num_items_in_batch=None):
        labels = inputs["labels"]
        self._tokens[0] += int((labels[..., 1:] != -100).sum())  # what the loss sees (after the shift)
        self._tokens[1] += labels[..., 1:].numel()
        if self._last_log_time is None:
            self._last_log_time = time.perf_counter()
        if self._digest_file is not None:
            with open(self._digest_file, "a") as f:
                f.write(json.dumps({
                    "step": self.state.global_step, "rank": self.args.process_index,
                    "world_size": self.args.world_size, "digest": batch_digest(inputs["input_ids"]),
                }) + "\n")
        return super().training_step(model, inputs, num_items_in_batch)


    def log(self, logs: dict, *args, **kwargs) -> None:
        """Add packing and throughput figures to every training-loss log (so TensorBoard shows them
        next to the loss): ``supervised_tokens_per_s`` and ``supervised_token_fraction`` summed over
        all ranks since the previous log, plus the constant ``packing_efficiency`` and ``rows_per_epoch``.
        Runs on every rank (Trainer logs collectively), so the all-reduce is safe."""
        if "loss" in logs and self._last_log_time is not None:
            counts = torch.tensor(self._tokens, dtype=torch.float64)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(counts)
            now = time.perf_counter()
            elapsed = now - self._last_log_time
            logs["supervised_tokens_per_s"] = round(float(counts[0]) / elapsed, 2) if elapsed > 0 else 0.0
            logs["supervised_token_fraction"] = round(float(counts[0] / counts[1]), 4) if counts[1] else 0.0
            logs.update(self._packing_stats)
            self._tokens = [0, 0]
            self._last_log_time = now
        super().log(logs, *args, **kwargs)


def batch_digest(input_ids) -> str:
    """Short content hash of a batch's ``input_ids`` (to check that ranks see different data)."""
    return hashlib.sha1(input_ids.cpu().numpy().tobytes()).hexdigest()[:16]
