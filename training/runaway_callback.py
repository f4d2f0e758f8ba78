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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class RunawayEvalCallback(TrainerCallback):
    """Runs ``decoding.runaway.evaluate_runaway`` every ``every_steps`` steps.

    Args:
        fmt: the run's ``ChatFormat`` (tokenizer, template, stop and control tokens).
        prompts: ``(messages, reference, source)`` triples, the held-out chats split before their
            final assistant turn.
        stop_ids: the run's stop ids (those written to ``generation_config.json``).
        every_steps, max_new_tokens: see ``RunawayEvalConfig``.
        output_dir: where rank 0 appends ``runaway_eval.jsonl``.

    Call ``attach(trainer)`` once the trainer exists (the metrics go through ``trainer.log``).
    """

    def __init__(self, fmt: Any, prompts: Sequence[tuple], stop_ids: Sequence[int], every_steps: int,
                 max_new_tokens: int, output_dir: str | Path):
        if not prompts:
            raise ValueError("runaway_eval needs held-out prompts; set data.eval_holdout >= 1")
        self.fmt, self.prompts, self.stop_ids = fmt, list(prompts), list(stop_ids)
        self.every_steps, self.max_new_tokens = every_steps, max_new_tokens
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
        """One ``RunawayReport`` on the prompts; every rank must call it under ZeRO-3."""
        import torch.distributed as dist
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        from decoding.runaway import evaluate_runaway

        synced = bool(is_deepspeed_zero3_enabled() and dist.is_initialized() and dist.get_world_size() > 1)
        return evaluate_runaway(
            model, self.fmt, self.prompts, self.stop_ids, self.max_new_tokens,
            batch_size=len(self.prompts), synced_gpus=synced,
        )


def heldout_prompts(heldout, limit: int) -> list[tuple]:
    """``(messages, reference, source)`` for the first ``limit`` held-out ``ChatRecord``s: the chat
    up to its final assistant turn, and that turn's content as the reference."""
    from data_utils.chat_format import ChatFormat

    return [(*ChatFormat.split_reference(r.as_dicts()), str(r.source)) for r in list(heldout)[:limit]]
