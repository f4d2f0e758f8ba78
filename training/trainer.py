"""``transformers.Trainer`` plus packlora's checkpoint extras and an optional per-rank batch log."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from transformers import Trainer, TrainerCallback

from training.checkpoint import verify_adapter, write_checkpoint_extras
from training.model import lora_shapes

logger = logging.getLogger(__name__)


class CheckpointExtrasCallback(TrainerCallback):
    """After every save (rank 0): write tokenizer, stop IDs and resolved config next to the
    adapter, then verify the adapter holds every LoRA tensor at full shape."""

    def __init__(self, tokenizer, config: dict, stop_ids: list[int], max_new_tokens: int, model):
        self.tokenizer, self.config, self.stop_ids, self.max_new_tokens = tokenizer, config, stop_ids, max_new_tokens
        self.expected = lora_shapes(model)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.finish(Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def finish(self, ckpt_dir: Path) -> None:
        write_checkpoint_extras(ckpt_dir, self.tokenizer, self.config, self.stop_ids, self.max_new_tokens)
        n = verify_adapter(ckpt_dir, self.expected)
        logger.info("checkpoint %s: %d LoRA tensors at full shape, stop ids %s", ckpt_dir, n, self.stop_ids)


class PackloraTrainer(Trainer):
    """Trainer that can log a digest of each batch per rank (``log_batch_digests: true``)."""

    def __init__(self, *args, batch_digest_dir: Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._digest_file = None
        if batch_digest_dir is not None:
            self._digest_file = Path(batch_digest_dir) / f"batches.rank{self.args.process_index}.jsonl"

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self._digest_file is not None:
            with open(self._digest_file, "a") as f:
                f.write(json.dumps({
                    "step": self.state.global_step, "rank": self.args.process_index,
                    "world_size": self.args.world_size, "digest": batch_digest(inputs["input_ids"]),
                }) + "\n")
        return super().training_step(model, inputs, num_items_in_batch)


def batch_digest(input_ids) -> str:
    """Short content hash of a batch's ``input_ids`` (to check that ranks see different data)."""
    return hashlib.sha1(input_ids.cpu().numpy().tobytes()).hexdigest()[:16]
