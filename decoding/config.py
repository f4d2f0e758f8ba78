"""``decoding:`` and ``runaway_eval:``: how a run's checkpoints stop, and how often training
measures whether they do.

    decoding:
      stop_tokens: null       # the chat format's end of turn and end of text (ChatML: 151645, 151643)
      max_new_tokens: 512     # tokens
    runaway_eval: {every_steps: 50, num_prompts: 4, max_new_tokens: 64}
"""
from __future__ import annotations

from dataclasses import dataclass, field

from data_utils.configtools import Section


@dataclass(frozen=True, kw_only=True)
class DecodingConfig(Section):
    """Stop handling written into every checkpoint's ``generation_config.json``."""

    section = "decoding"

    stop_tokens: list[str] | None = None
    """Tokens that end generation, each exactly one token of the tokenizer; their ids become
    ``generation_config.eos_token_id``. null: the chat format's own end-of-turn and end-of-text
    tokens (``ChatFormat.default_stop_tokens``). Multi-token stop strings belong to the decoder."""
    max_new_tokens: int = field(default=512, metadata={"min": 1, "unit": "tokens"})
    """Generation length limit."""


@dataclass(frozen=True, kw_only=True)
class RunawayEvalConfig(Section):
    """Runaway metrics on held-out prompts during training (``training/runaway_callback.py``, metrics in ``decoding/runaway.py``)."""

    section = "runaway_eval"

    every_steps: int = field(default=0, metadata={"min": 0, "unit": "optimizer steps"})
    """Run every this many optimizer steps, logged to TensorBoard as ``runaway/*``; 0 = off.
    Needs ``data.eval_holdout`` >= 1 (the prompts are the held-out chats)."""
    num_prompts: int = field(default=4, metadata={"min": 1})
    """Held-out prompts decoded each time (the first ``num_prompts`` of the hold-out)."""
    max_new_tokens: int = field(default=64, metadata={"min": 1, "unit": "tokens"})
    """Tokens generated per prompt before a reply counts as ``hit_max_new_tokens``."""
