"""Record types, one per pipeline stage. Data flows one way::

    Message/ChatRecord/TextRecord  ->  Segment  ->  PackedRow  ->  collated batch (dict of tensors)

Labels are aligned with ``input_ids`` (``labels[t]`` is the target *for* token ``t``).
The shift happens inside the Hugging Face model (logits at ``t`` are scored against
``labels[t + 1]``), so nothing in packlora shifts labels itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

IGNORE_INDEX = -100
"""Label value that ``torch.nn.CrossEntropyLoss`` (and every HF causal-LM loss) skips."""

ROLES = ("system", "user", "assistant")

# The choices of the ``data:`` settings, defined once (``data_utils/config.py`` documents each).
RecordFormat = Literal["auto", "messages", "sharegpt", "alpaca", "text"]
Overflow = Literal["auto", "drop", "error", "split"]
OnError = Literal["error", "skip"]
Stage = Literal["auto", "pretrain", "sft"]
TextEos = Literal["document", "chunk"]
LabelMode = Literal["assistant_only", "legacy_full_sequence"]


@dataclass(frozen=True, slots=True)
class Source:
    """Where a record came from, for error messages and reports.

    Attributes:
        path: the file the record was read from.
        line: 1-based line number in ``path``.
    """

    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True, slots=True)
class Message:
    """One chat turn.

    Attributes:
        role: one of ``ROLES``.
        content: the plain text (for an assistant turn: the reply).
        reasoning: an assistant turn's reasoning (``reasoning_content``), for templates that render
            it (Qwen3); None when the record has none.
    """

    role: str
    content: str
    reasoning: str | None = None

    def as_dict(self) -> dict[str, str]:
        """``{"role", "content"}``, plus ``"reasoning_content"`` when there is reasoning."""
        d = {"role": self.role, "content": self.content}
        if self.reasoning is not None:
            d["reasoning_content"] = self.reasoning
        return d


@dataclass(frozen=True, slots=True)
class ChatRecord:
    """A validated chat: optional leading system message, then user/assistant turns.

    Attributes:
        messages: the turns, in order; at least one is from the assistant.
        source: file and line of the record.
    """

    messages: tuple[Message, ...]
    source: Source

    def as_dicts(self) -> list[dict[str, str]]:
        """The messages as ``[{"role": ..., "content": ...}]``, the form chat templates take."""
        return [m.as_dict() for m in self.messages]


@dataclass(frozen=True, slots=True)
class TextRecord:
    """A raw-text document for continued pre-training (stage 1)."""

    text: str
    source: Source


@dataclass(frozen=True, slots=True)
class Segment:
    """One tokenised example, ready to be packed.

    Attributes:
        input_ids: token ids, length ``n`` (tokens, not characters).
        labels: length ``n``; ``labels[t] == input_ids[t]`` where token ``t`` is trained,
            ``IGNORE_INDEX`` elsewhere. Not shifted (see module docstring).
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"Segment has {len(self.input_ids)} input_ids but {len(self.labels)} labels; they must be equal"
            )

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        """Number of tokens whose label is not ``IGNORE_INDEX``."""
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


@dataclass(frozen=True, slots=True)
class PackedRow:
    """Several segments laid end to end in one row of at most ``max_seq_length`` tokens.

    ``seq_lens`` is the single source of truth for segment boundaries: the collator derives
    ``position_ids`` (and flash-attention ``cu_seq_lens``) from it, never from the tokens.

    Attributes:
        input_ids: ``sum(seq_lens)`` token ids.
        labels: same length, per-segment labels as in ``Segment`` (first-token masking is
            the collator's job).
        seq_lens: the length in tokens of each segment, in order; all > 0.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    seq_lens: tuple[int, ...]

    def __post_init__(self) -> None:
        if sum(self.seq_lens) != len(self.input_ids) or len(self.input_ids) != len(self.labels):
            raise ValueError(
                f"PackedRow is inconsistent: sum(seq_lens)={sum(self.seq_lens)}, "
                f"len(input_ids)={len(self.input_ids)}, len(labels)={len(self.labels)}"
            )
        if any(n <= 0 for n in self.seq_lens):
            raise ValueError(f"PackedRow seq_lens must all be > 0, got {self.seq_lens}")

    @classmethod
    def of(cls, row) -> "PackedRow":
        """A ``PackedRow`` from a packed dataset's row (a mapping with ``input_ids``, ``labels`` and
        ``seq_lens``), checked as every ``PackedRow`` is; a ``PackedRow`` is returned as it is.

        >>> PackedRow.of({"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "seq_lens": [2, 1]}).seq_lens
        (2, 1)
        """
        if isinstance(row, cls):
            return row
        return cls(tuple(row["input_ids"]), tuple(row["labels"]), tuple(row["seq_lens"]))
