"""Label audit: what a packed row actually trains, counted from the labels themselves.

The counts are taken *after* the collator's first-label masking, i.e. exactly what the loss sees,
and independently of how the labels were built, so a bug in ``tokenize_chat`` shows up here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from data_utils.collator import PackedCollator
from data_utils.types import IGNORE_INDEX

ROLE_START_TOKEN = "<|im_start|>"


@dataclass(frozen=True, slots=True)
class LabelAudit:
    """Counts over packed rows (units: tokens, except ``turns_with_im_end_trained``: turns).

    Attributes:
        supervised_tokens: labels the loss sees (not -100).
        role_markers_in_labels: trained tokens inside a ``<|im_start|>role\\n`` header. Must be 0.
        turns_with_im_end_trained: trained end-of-turn tokens (one per assistant turn when correct).
    """

    supervised_tokens: int
    role_markers_in_labels: int
    turns_with_im_end_trained: int


def header_positions(input_ids: list[int], role_start_id: int | None, tokenizer) -> list[int]:
    """Positions of every ``<|im_start|>`` and the following tokens up to and including the first
    token whose text contains a newline (the role header ``<|im_start|>assistant\\n``)."""
    if role_start_id is None:
        return []
    out = []
    n = len(input_ids)
    for p, t in enumerate(input_ids):
        if t != role_start_id:
            continue
        out.append(p)
        q = p + 1
        while q < n and q - p <= 16:  # a role name is a few tokens; bound the scan
            out.append(q)
            if "\n" in tokenizer.decode([input_ids[q]]):
                break
            q += 1
    return out


def audit_rows(rows: Iterable[dict], tokenizer, eot_id: int, pad_token_id: int) -> LabelAudit:
    """Audit packed rows (dicts with ``input_ids``, ``labels``, ``seq_lens``)."""
    role_start_id = tokenizer.get_vocab().get(ROLE_START_TOKEN)
    collate = PackedCollator(pad_token_id=pad_token_id)
    supervised = markers = eot = 0
    for row in rows:
        batch = collate([row])
        ids = batch["input_ids"][0].tolist()
        labels = batch["labels"][0].tolist()
        trained = [lab != IGNORE_INDEX for lab in labels]
        supervised += sum(trained)
        markers += sum(trained[p] for p in header_positions(ids, role_start_id, tokenizer))
        eot += sum(1 for t, tr in zip(ids, trained) if tr and t == eot_id)
    return LabelAudit(supervised, markers, eot)


def render_row(row: dict, tokenizer, color: bool = True) -> str:
    """The row's text with trained tokens highlighted (green) and segment starts marked ``‖``.

    Without colour, trained spans are wrapped in ``[[...]]``. Labels are those the loss sees.
    Runs of tokens are decoded together so multi-byte characters stay whole.
    """
    batch = PackedCollator(pad_token_id=0)([row])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
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


def trained_text(row: dict, tokenizer) -> str:
    """Only the trained tokens of a row, decoded segment by segment, one segment per line."""
    batch = PackedCollator(pad_token_id=0)([row])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    pieces, start = [], 0
    for n in row["seq_lens"]:
        keep = [i for i, lab in zip(ids[start : start + n], labels[start : start + n]) if lab != IGNORE_INDEX]
        pieces.append(tokenizer.decode(keep))
        start += n
    return "\n".join(f"[{k}] {p!r}" for k, p in enumerate(pieces))
