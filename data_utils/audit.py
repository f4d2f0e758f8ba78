"""Label audit: what a packed row actually trains, counted from the labels themselves.

The counts are taken on the labels the loss sees, that is with the first label of every packed
segment masked (``loss_labels``, the rule the collator applies), and independently of how the
labels were built, so a bug in the labelling shows up here. Role headers, control tokens and the
end of turn come from the ``ChatFormat``, so the audit holds for any format.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from packlora.data_utils.chat_format import ChatFormat
from packlora.data_utils.types import IGNORE_INDEX


@dataclass(frozen=True, slots=True)
class LabelAudit:
    """Counts over packed rows (units: tokens, except ``turns_with_end_of_turn_trained``: turns).

    Attributes:
        supervised_tokens: labels the loss sees (not -100).
        role_markers_in_labels: trained tokens inside a role header (``ChatFormat.header_positions``:
            ChatML's start token + ``user\\n``, Llama-3's start + ``user`` + end + ``\\n\\n``). Must be 0.
        control_tokens_in_labels: trained control tokens other than the end of turn (and a Qwen3
            reply's reasoning tags, and the eos that ends a stage-1 document). Must be 0: the only
            control token a model learns to write in a chat is the one that ends its turn.
        turns_with_end_of_turn_trained: trained end-of-turn tokens (one per assistant turn when correct).
    """

    supervised_tokens: int
    role_markers_in_labels: int
    control_tokens_in_labels: int
    turns_with_end_of_turn_trained: int


@dataclass(frozen=True, slots=True)
class AuditVerdict:
    """Whether a run's labels may be trained: the one rule ``packlora train`` and ``packlora inspect``
    both apply (``judge_labels``).

    Attributes:
        problems: what fails the audit, one line each; empty when it passes.
        legacy: the run reproduces the runaway bug on purpose (``data.labels: legacy_full_sequence``):
            training then goes ahead with a warning instead of refusing.
    """

    problems: tuple[str, ...]
    legacy: bool = False

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def may_train(self) -> bool:
        """Passed, or failed on purpose (legacy)."""
        return self.passed or self.legacy


def judge_labels(report, legacy: bool = False) -> AuditVerdict:
    """The verdict on a data report's audit counts (``role_markers_in_labels``, ``control_tokens_in_labels``,
    ``turns_with_end_of_turn_trained``, ``assistant_turns``: a ``DataReport`` or anything with them).

    It fails when a role-marker token or a control token other than the end of turn carries a label
    (the model would learn to write new turns), or when an assistant turn's end of turn is not
    trained (the model would not learn to stop).

    >>> from types import SimpleNamespace as R
    >>> judge_labels(R(role_markers_in_labels=0, control_tokens_in_labels=0, turns_with_end_of_turn_trained=3,
    ...                assistant_turns=3)).passed
    True
    >>> judge_labels(R(role_markers_in_labels=4, control_tokens_in_labels=0, turns_with_end_of_turn_trained=2,
    ...                assistant_turns=3)).problems
    ('4 role-marker tokens carry a label', '1 of 3 assistant turns do not train their end of turn')
    """
    problems = []
    if report.role_markers_in_labels:
        problems.append(f"{report.role_markers_in_labels} role-marker tokens carry a label")
    if report.control_tokens_in_labels:
        problems.append(f"{report.control_tokens_in_labels} control tokens other than the end of turn carry a label")
    missing = report.assistant_turns - report.turns_with_end_of_turn_trained
    if missing > 0:
        problems.append(f"{missing} of {report.assistant_turns} assistant turns do not train their end of turn")
    return AuditVerdict(tuple(problems), legacy)


def loss_labels(labels: Sequence[int], seq_lens: Sequence[int]) -> list[int]:
    """``labels`` with the first label of every segment set to -100: what the loss sees.

    >>> loss_labels([5, 6, 7, 8, 9], [3, 2])
    [-100, 6, 7, -100, 9]
    """
    out, start = list(labels), 0
    for n in seq_lens:
        out[start] = IGNORE_INDEX
        start += n
    return out


def audit_rows(rows: Iterable[Mapping], fmt: ChatFormat) -> LabelAudit:
    """Audit packed rows (mappings with ``input_ids``, ``labels``, ``seq_lens``, or a ``datasets.Dataset``
    of them, read column-wise) under ``fmt``."""
    import numpy as np

    supervised = markers = control = eot = 0
    banned = np.fromiter(fmt.control_ids - fmt.trainable_control_ids(), dtype=np.int64)
    for ids, labels, seq_lens in _row_arrays(rows):
        trained = labels != IGNORE_INDEX
        trained[np.cumsum(seq_lens) - seq_lens] = False  # as loss_labels: the first label of each segment
        supervised += int(trained.sum())
        markers += int(trained[fmt.header_positions(ids.tolist())].sum())
        control += int((trained & np.isin(ids, banned)).sum())
        eot += int((trained & (ids == fmt.end_of_turn_id)).sum())
    return LabelAudit(supervised, markers, control, eot)


def _row_arrays(rows):
    """``(input_ids, labels, seq_lens)`` of every row as int64 numpy arrays; a ``datasets.Dataset`` is read
    in Arrow batches instead of row by row."""
    import numpy as np

    if not hasattr(rows, "with_format"):
        for row in rows:
            yield (np.asarray(row["input_ids"], dtype=np.int64).reshape(-1),
                   np.asarray(row["labels"], dtype=np.int64).reshape(-1), np.asarray(row["seq_lens"], dtype=np.int64))
        return
    for batch in rows.with_format("arrow").iter(1000):
        cols = [batch.column(c).combine_chunks() for c in ("input_ids", "labels", "seq_lens")]
        flat = [c.flatten().to_numpy(zero_copy_only=False).astype(np.int64) for c in cols]
        offsets = [c.offsets.to_numpy() - c.offsets[0].as_py() for c in cols]
        for r in range(len(batch)):
            yield tuple(f[o[r]:o[r + 1]] for f, o in zip(flat, offsets))


def render_row(row: Mapping, tokenizer, color: bool = True) -> str:
    """The row's text with trained tokens highlighted (green) and segment starts marked ``‖``.

    Without colour, trained spans are wrapped in ``[[...]]``. Labels are those the loss sees.
    Runs of tokens are decoded together so multi-byte characters stay whole.
    """
    ids, labels = list(row["input_ids"]), loss_labels(row["labels"], row["seq_lens"])
    on, off = ("\x1b[1;32m", "\x1b[0m") if color else ("[[", "]]")
    out, start = [], 0
    for k, n in enumerate(row["seq_lens"]):
        if k:
            out.append("‖")
        run: list[int] = []
        run_trained = False
        for tok, lab in zip(ids[start : start + n], labels[start : start + n]):
            trained = lab != IGNORE_INDEX
            if trained != run_trained and run:
                out.append(_wrap(tokenizer.decode(run), run_trained, on, off))
                run = []
            run_trained = trained
            run.append(tok)
        if run:
            out.append(_wrap(tokenizer.decode(run), run_trained, on, off))
        start += n
    return "".join(out)


def _wrap(text: str, trained: bool, on: str, off: str) -> str:
    return f"{on}{text}{off}" if trained else text


def trained_text(row: Mapping, tokenizer) -> str:
    """Only the trained tokens of a row, decoded segment by segment, one segment per line."""
    ids, labels = list(row["input_ids"]), loss_labels(row["labels"], row["seq_lens"])
    pieces, start = [], 0
    for n in row["seq_lens"]:
        keep = [i for i, lab in zip(ids[start : start + n], labels[start : start + n]) if lab != IGNORE_INDEX]
        pieces.append(tokenizer.decode(keep))
        start += n
    return "\n".join(f"[{k}] {p!r}" for k, p in enumerate(pieces))
