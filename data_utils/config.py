"""``data:``: the data settings of a run, typed and validated on construction (no side effects).

    data:
      train: [../shared/data/shishuo/stage2_rewrite.jsonl]
      max_seq_length: 1024        # tokens per packed row
      overflow: drop              # an over-long chat is dropped whole, and counted
      eval_holdout: 4             # chats held out of training and decoded after it
      chat_format: auto           # chatml / qwen3 / llama3 / generic, detected from the tokenizer

Whether the files can be read is checked separately (``missing_files``), before any process starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from packlora.core.config import Section
from packlora.data_utils.chat_format import FormatName as ChatFormatName
from packlora.data_utils.sources import parse_source
from packlora.data_utils.types import LabelMode, OnError, Overflow, RecordFormat, Stage, TextEos


@dataclass(frozen=True, kw_only=True)
class DataConfig(Section):
    """Input data, tokenisation and packing."""

    section = "data"

    train: list[str | dict] = field(default_factory=list)
    """Sources to train on: paths (JSONL, JSON, Parquet, CSV, a ``save_to_disk`` directory, a dataset
    name) or mappings with ``path``, ``format``, ``split``, ``columns``, ``weight``, ``max_records``
    (``data_utils/sources.py``). A single path is read as a list of one."""
    eval: list[str | dict] = field(default_factory=list)
    """Sources of the evaluation-loss set (as ``train``; ``weight`` is ignored). Or ``eval_split``."""
    eval_split: float | int | None = None
    """Records drawn (seeded) out of the training sources for the evaluation loss: a fraction in
    (0, 1) or a count. Drawn after ``eval_holdout``, so the decoded prompts are never in it."""
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
    num_proc: int | None = field(default=None, metadata={"min": 1})
    """Processes that tokenise and label in parallel (``datasets.map(num_proc=...)``). null: the CPUs
    this process may use, or 1 below 2,000 records (starting processes costs more than it saves)."""

    def normalize(self) -> None:
        for name in ("train", "eval"):
            if isinstance(getattr(self, name), (str, dict)):
                object.__setattr__(self, name, [getattr(self, name)])

    def rules(self) -> list[str]:
        p = [] if self.train else [f"{self.key('train')}: give at least one data source"]
        for name in ("train", "eval"):
            for i, entry in enumerate(getattr(self, name)):
                try:
                    p += parse_source(entry).problems(f"{self.key(name)}[{i}]")
                except TypeError as e:
                    p.append(f"{self.key(name)}[{i}]: {e}")
        if self.stage == "sft" and self.overflow == "split":
            p.append(f"{self.key('overflow')}: split would cut chats mid-answer under data.stage=sft; use drop or error")
        split = self.eval_split
        if split is not None and (isinstance(split, float) and not 0 < split < 1 or isinstance(split, int) and split < 1):
            p.append(f"{self.key('eval_split')}: a fraction in (0, 1) or a count >= 1 of records, got {split!r}")
        if split is not None and self.eval:
            p.append(f"{self.key('eval_split')}: give data.eval or data.eval_split, not both")
        return p

    def sources(self, name: str = "train") -> list:
        """The ``SourceSpec`` of every entry of ``data.train`` (or ``data.eval``)."""
        return [parse_source(e) for e in getattr(self, name)]

    def missing_files(self) -> list[str]:
        """One line per local data source that cannot be read (``SourceSpec.disk_error``: missing, a
        directory, a FIFO or device, unreadable, compressed), starting with its key; relative paths are
        from the working directory."""
        return [p for name in ("train", "eval") for i, s in enumerate(self.sources(name))
                for p in s.missing(f"{self.key(name)}[{i}]")]

    def resolved_num_proc(self, records: int) -> int:
        """``num_proc``, or its default for ``records`` records (see the field)."""
        if self.num_proc is not None:
            return self.num_proc
        import os

        return 1 if records < 2000 else max(1, len(os.sched_getaffinity(0)))

    def chat_format_for(self, tokenizer):
        """The ``ChatFormat`` these settings ask for, over ``tokenizer``."""
        from packlora.data_utils.chat_format import ChatFormat

        return ChatFormat(tokenizer, self.chat_format, enable_thinking=self.enable_thinking,
                          train_reasoning=self.train_reasoning)
