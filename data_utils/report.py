"""What happened to the data, for ``data_report.json``, ``packlora inspect`` and the label audit:
``DataReport``, built by ``build_report`` from the stages' records (``data_utils/dataset.py``), and
the reasons a line or example can be left out (``DROP_REASONS``)."""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from packlora.core.errors import InputError
from packlora.data_utils.chat_format import LABEL_REASONS
from packlora.data_utils.records import REASONS
from packlora.presets import GUARDED_ACTIONS

if TYPE_CHECKING:
    from packlora.data_utils.chat_format import ChatFormat
    from packlora.data_utils.config import DataConfig

DROP_REASONS = (*REASONS, "duplicate", *LABEL_REASONS, "too_long", "no_trained_tokens")
"""Every reason the data report counts a line or example under (``DataReport.dropped``): a bad line
(``records.REASONS``), a duplicate record, a chat that cannot be labelled (``chat_format.LABEL_REASONS``),
an example over ``max_seq_length`` under ``overflow: drop``, an example with nothing to train."""
ON_ERROR_REASONS = (*REASONS, "duplicate")
"""The reasons ``data.on_error`` decides about (the others: ``data.overflow`` / ``max_seq_length``)."""


class NoExampleError(InputError):
    """Every example was dropped or skipped; ``report`` holds the counts (a dict) for data_report.json."""

    def __init__(self, message: str, report: dict):
        self.report = report
        super().__init__(message)

    def __reduce__(self):
        return type(self), (str(self), self.report)


@dataclass(frozen=True)
class DataReport:
    """What happened to the data (units in the field names' terms: lines, records, examples, rows, tokens).

    ``lines_read`` counts the lines of the input files; ``records`` the valid, unique ones among
    them; ``examples`` the segments kept for training (a split text document counts once per
    chunk, a chat split per assistant turn once per turn). ``dropped`` maps a reason to a count: a
    bad line skipped under ``data.on_error: skip`` (one of ``records.REASONS``), ``duplicate``, a
    chat that cannot be labelled under ``skip`` (``template_mismatch``, ``no_end_of_turn``,
    ``reasoning_with_thinking_off``), ``too_long`` (over ``max_seq_length`` under ``overflow:
    drop``), ``no_trained_tokens``. ``preset_actions`` counts what the preset did to each chat
    (``presets.PresetAction``), held-out chats included, and ``chats_with_guard`` how many end up
    with its guard. ``chats_split_per_turn`` counts chats whose template renders earlier turns
    differently once a later turn exists (Qwen3), trained as one example per assistant turn;
    ``render_mismatch`` the examples whose ids do not decode to the template's rendering (an
    audit); ``messages_with_control_text`` the messages whose text spells a control token (kept as
    text). The label audit's counts are in ``supervised_tokens`` ... ``turns_with_end_of_turn_trained``.
    ``sources`` gives each source's ``lines_read``, unique ``records``, ``skipped`` lines by reason
    (``lines_read == records + sum(skipped.values())``) and ``in_mix`` (records in the training mix
    after hold-outs and ``weight``); ``evaluation`` the evaluation-loss set's ``records``,
    ``examples`` and ``rows``. Every reason is one of ``DROP_REASONS``.
    """

    records: int
    heldout: int
    examples: int
    dropped: dict[str, int]
    split_chunks: int
    rows: int
    packing_efficiency: float
    supervised_tokens: int
    role_markers_in_labels: int
    control_tokens_in_labels: int
    turns_with_end_of_turn_trained: int
    assistant_turns: int
    max_seq_length: int
    chat_format: str
    cache_files: list[str] = field(default_factory=list)
    lines_read: int = 0
    chats_with_guard: int = 0
    preset_actions: dict[str, int] = field(default_factory=dict)
    chats_split_per_turn: int = 0
    render_mismatch: int = 0
    messages_with_control_text: int = 0
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    evaluation: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def build_report(records, split, tokenized, packed, audit, cfg: DataConfig, fmt: ChatFormat,
                 eval_packed=None) -> DataReport:
    """The ``DataReport`` of one ``prepare_data`` call, from its stages' records (``dataset.RecordSet``,
    ``Split``, ``Tokenized``, ``Packed``, the evaluation set's ``Packed`` or None) and the label audit."""
    c = tokenized.counts
    sources = {name: {**counts, "in_mix": split.in_mix.get(name, 0)} for name, counts in records.per_source.items()}
    evaluation = {"records": len(split.eval) if split.eval is not None else 0, "rows": len(eval_packed.rows) if eval_packed else 0,
                  "examples": sum(len(r) for r in eval_packed.rows["seq_lens"]) if eval_packed else 0}
    return DataReport(
        records=records.count, heldout=len(split.heldout), examples=len(tokenized.examples),
        dropped=dict(sorted((Counter(tokenized.dropped) + Counter(records.skipped)).items())),
        split_chunks=c["chunks"], rows=len(packed.rows), packing_efficiency=packed.efficiency,
        supervised_tokens=audit.supervised_tokens, role_markers_in_labels=audit.role_markers_in_labels,
        control_tokens_in_labels=audit.control_tokens_in_labels,
        turns_with_end_of_turn_trained=audit.turns_with_end_of_turn_trained, assistant_turns=c["assistant_turns"],
        max_seq_length=cfg.max_seq_length, chat_format=fmt.name,
        cache_files=[tokenized.cache_file, packed.cache_file], lines_read=records.lines_read,
        chats_with_guard=sum(n for a, n in split.preset_actions.items() if a in GUARDED_ACTIONS),
        preset_actions=split.preset_actions, chats_split_per_turn=c["per_turn"], render_mismatch=c["render_mismatch"],
        messages_with_control_text=c["control_text"], sources=sources, evaluation=evaluation,
    )
