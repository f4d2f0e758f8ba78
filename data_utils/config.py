"""``data:``: the data settings of a run, typed and validated on construction (no side effects).

    data:
      train: [../shared/data/shishuo/stage2_rewrite.jsonl]
      max_seq_length: 1024        # tokens per packed row
      overflow: drop              # an over-long chat is dropped whole, and counted
      eval_holdout: 4             # chats held out of training and decoded after it
      chat_format: auto           # chatml / qwen3 / llama3 / generic, detected from the tokenizer

Whether the files exist is checked separately (``missing_files``), right before the data is read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from data_utils.chat_format import FormatName as ChatFormatName
from data_utils.configtools import Section

RecordFormat = Literal["auto", "messages", "sharegpt", "alpaca", "text"]
Overflow = Literal["auto", "drop", "error", "split"]
OnError = Literal["error", "skip"]
Stage = Literal["auto", "pretrain", "sft"]
TextEos = Literal["document", "chunk"]
LabelMode = Literal["assistant_only", "legacy_full_sequence"]


@dataclass(frozen=True, kw_only=True)
class DataConfig(Section):
    """Input data, tokenisation and packing."""

    section = "data"

    train: list[str] = field(default_factory=list)
    """JSONL file(s) to train on (a single path is read as a list of one)."""
    format: RecordFormat = "auto"
    """``messages``, ``sharegpt``, ``alpaca``, ``text`` or ``auto`` (per line, from its keys)."""
    max_seq_length: int = field(default=2048, metadata={"min": 8, "unit": "tokens"})
    """Tokens per packed row."""
    overflow: Overflow = "auto"
    """An example longer than ``max_seq_length``: ``drop`` (counted), ``error``, or ``split`` (raw text
    only). ``auto``: ``drop`` for chats, ``split`` for text."""
    eval_holdout: int = field(default=0, metadata={"min": 0, "unit": "records"})
    """Chat records held out of training (drawn with ``seed``) and decoded after training."""
    cache_dir: str | None = None
    """Where tokenised and packed datasets are cached; default ``~/.cache/packlora/datasets``."""
    on_error: OnError = "error"
    """A bad line, a duplicate record or a chat that cannot be labelled: ``error`` stops before
    training, naming file, line and field; ``skip`` leaves it out and counts it by reason in
    ``output_dir/data_report.json``."""
    packing: bool = True
    """Pack examples into rows of ``max_seq_length`` (best-fit-decreasing). ``false``: one example
    per row, padded per batch (a baseline; the same labels and loss)."""
    stage: Stage = "auto"
    """``pretrain`` (stage 1: ``{"text"}`` records only, every token trained, long documents split
    into counted chunks), ``sft`` (chats only, assistant-only labels), or ``auto`` (each record by
    its kind). A record of the wrong kind is an error naming its line."""
    text_eos: TextEos = "document"
    """Where EOS goes in raw text: ``document`` (only at a document's true end) or ``chunk``
    (every split chunk ends with EOS)."""
    labels: LabelMode = "assistant_only"
    """``assistant_only`` (the default and the only sound choice): train assistant replies and
    their end-of-turn token, each packed segment isolated. ``legacy_full_sequence`` reproduces the
    runaway bug on purpose, never use it for a real model: labels cover the whole chat text, role
    markers included, and segments are packed without isolation (see docs/behaviour-boundary.md)."""
    chat_format: ChatFormatName = "auto"
    """How chats look (``data_utils/chat_format.py``): ``auto`` detects ``chatml`` (Qwen2/2.5),
    ``qwen3`` or ``llama3`` from the tokenizer, else ``generic`` (any template, split by prefixes)."""
    enable_thinking: bool | None = None
    """qwen3: passed to the chat template; null = the template's default (thinking on). With
    ``false``, a reply that carries reasoning is refused (an error, or a counted skip)."""
    train_reasoning: bool = True
    """qwen3: train a reply's ``<think>…</think>`` block (true) or use it only as context (false)."""

    def normalize(self) -> None:
        if isinstance(self.train, str):
            object.__setattr__(self, "train", [self.train])

    def rules(self) -> list[str]:
        p = [] if self.train else [f"{self.key('train')}: give at least one data file"]
        if self.stage == "sft" and self.overflow == "split":
            p.append(f"{self.key('overflow')}: split would cut chats mid-answer under data.stage=sft; use drop or error")
        return p

    def missing_files(self) -> list[str]:
        """Problems for data files that do not exist (relative paths: from the working directory)."""
        return [f"{self.key('train')}: file {f!r} does not exist (paths are relative to {Path.cwd()})"
                for f in self.train if not Path(f).is_file()]

    def chat_format_for(self, tokenizer):
        """The ``ChatFormat`` these settings ask for, over ``tokenizer``."""
        from data_utils.chat_format import ChatFormat

        return ChatFormat(tokenizer, self.chat_format, enable_thinking=self.enable_thinking,
                          train_reasoning=self.train_reasoning)
