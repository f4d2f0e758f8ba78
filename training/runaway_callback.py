"""Runaway metrics during training, logged to TensorBoard next to the loss.

Every ``runaway_eval.every_steps`` optimizer steps the callback decodes the first
``runaway_eval.num_prompts`` held-out chats greedily with the run's stop ids and logs
``runaway/runaway``, ``runaway/emitted_end_of_turn``, ``runaway/role_leak``, ... (defined in
``decoding.runaway``) through ``Trainer.log``; rank 0 also appends each report to
``output_dir/runaway_eval.jsonl``. Configure it in the run YAML::

    data: {eval_holdout: 8}
    runaway_eval: {every_steps: 50, num_prompts: 4, max_new_tokens: 64}

Under ZeRO-3 the parameters are partitioned, so every rank takes part in every forward pass:
all ranks run ``generate`` on the same prompts with ``synced_gpus=True`` (a rank that has
finished keeps stepping until all have). Under ZeRO-2 or a single process each rank decodes on
its own (identical greedy results); only rank 0 writes.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class RunawayEvalCallback(TrainerCallback):
    """Runs ``evaluate`` every ``every_steps`` steps and logs what it reports.

    Args:
        evaluate: ``evaluate(model, synced_gpus=bool) -> report``, a report with ``to_dict()`` and
            ``scalars()`` (``decoding.runaway.evaluate_runaway`` with the run's format, held-out
            prompts, stop ids and ``max_new_tokens`` bound; the entry point builds it, so training
            needs no decoding code of its own).
        every_steps: see ``RunawayEvalConfig``.
        output_dir: where rank 0 appends ``runaway_eval.jsonl``.

    Call ``attach(trainer)`` once the trainer exists (the metrics go through ``trainer.log``).
    """

    def __init__(self, evaluate: Callable[..., Any], every_steps: int, output_dir: str | Path):
        self.run_eval, self.every_steps = evaluate, every_steps
        self.output_dir = Path(output_dir)
        self.trainer = None

    def attach(self, trainer) -> RunawayEvalCallback:
        self.trainer = trainer
        return self

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.every_steps <= 0 or state.global_step % self.every_steps:
            return
        report = self.evaluate(model)
        if state.is_world_process_zero:
            with open(self.output_dir / "runaway_eval.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **report.to_dict()}, ensure_ascii=False) + "\n")
            logger.info("step %d runaway eval: %s", state.global_step, json.dumps(report.scalars()))
        if self.trainer is not None:
            # Trainer.log resets control.should_log; keep it, or this step's loss would go unlogged.
            should_log = control.should_log
            self.trainer.log(report.scalars())
            control.should_log = self.trainer.control.should_log = should_log
        return control

    def evaluate(self, model):
        """One report on the prompts; every rank must call it under ZeRO-3 (``synced_gpus``)."""
        import torch.distributed as dist
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        synced = bool(is_deepspeed_zero3_enabled() and dist.is_initialized() and dist.get_world_size() > 1)
        return self.run_eval(model, synced_gpus=synced)


def heldout_prompts(heldout, limit: int) -> list[tuple]:
    """``(messages, reference, source)`` for the first ``limit`` held-out ``ChatRecord``s: the chat
    up to its final assistant turn, and that turn's content as the reference."""
    from packlora.data_utils.chat_format import ChatFormat

    return [(*ChatFormat.split_reference(r.as_dicts()), str(r.source)) for r in list(heldout)[:limit]]
