"""Packed rows -> a batch of tensors with per-segment positions and masked first labels.

For a batch of ``B`` rows padded to ``L`` (the longest row, rounded up to ``pad_to_multiple_of``)
the collator returns ``input_ids``, ``labels`` and ``position_ids``, each ``[B, L]`` int64, and **no
``attention_mask``**. Example: one row with ``seq_lens=[3, 2]`` padded to 7 (``P`` = pad)::

    input_ids     a0 a1 a2 b0 b1  P  P
    position_ids   0  1  2  0  1  0  1      restart at every segment (and for the padding)
    labels         ·  a1 a2  · b1  ·  ·      first label of each segment and all padding = -100

How attention stays inside a segment: transformers (>= 5) derives a block-diagonal causal mask
from ``position_ids`` that restart, when ``attention_mask`` is None and no KV cache is used
(``transformers.masking_utils.find_packed_sequence_indices``); flash-attention 2 uses the same
boundaries as varlen ``cu_seq_lens``. Padding forms its own block, so it never leaks into a segment.
Training keeps ``use_cache=False`` (Trainer's default); custom forward passes must pass it too.

Why the first label is masked: HF models shift labels inside the loss, so the logit at the last
token of segment ``k`` is scored against ``labels[first token of k+1]``. Masking it means no
example is trained from the end of the previous one (chat and raw text alike).

With ``flash_attn_varlen=True`` (GPU, ``attn_implementation`` ``flash_attention_2`` or ``varlen``) rows are instead
concatenated into one ``[1, T]`` row without padding and ``cu_seq_lens_q/k`` (int32, ``[S + 1]``) and
``max_length_q/k`` are added, as ``transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)``
does.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from packlora.data_utils.types import IGNORE_INDEX, PackedRow


@dataclass(frozen=True, slots=True)
class PackedCollator:
    """Collate packed rows (``PackedRow``s, or a packed dataset's rows: mappings with ``input_ids``,
    ``labels``, ``seq_lens``, each turned into a ``PackedRow`` and so checked) into a batch.

    Attributes:
        pad_token_id: id written into padding positions (their labels are -100).
        pad_to_multiple_of: round ``L`` up to a multiple of this (None: no rounding).
        flash_attn_varlen: emit the flattened ``[1, T]`` layout with ``cu_seq_lens`` (see module doc).
        isolate_segments: True (default): positions restart and first labels are masked per
            segment. False reproduces the runaway bug (``data.labels: legacy_full_sequence``):
            positions run on across the row and every label is kept, so segments attend to and
            are trained from the ones before them.
        loss_normalization: ``per_token`` (default) sends no weights: every trained token counts
            once. ``per_example`` adds ``loss_weights`` (float32, same shape as ``labels``):
            ``1 / n_e`` on each trained label of segment ``e`` with ``n_e`` trained labels, 0
            elsewhere, so every example weighs the same whatever its length (see
            ``training/loss.py``). Each segment's weights sum to 1.

    >>> c = PackedCollator(pad_token_id=0)
    >>> b = c([{"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "seq_lens": [3, 2]},
    ...        {"input_ids": [4, 4], "labels": [-100, 4], "seq_lens": [2]}])
    >>> b["position_ids"].tolist()
    [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    >>> b["labels"].tolist()
    [[-100, 6, 7, -100, 9], [-100, 4, -100, -100, -100]]
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None
    flash_attn_varlen: bool = False
    isolate_segments: bool = True
    loss_normalization: str = "per_token"

    def __call__(self, rows: Sequence[Mapping | PackedRow]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("PackedCollator got an empty batch")
        rows = [PackedRow.of(r) for r in rows]  # every row checked once, by the record type's own invariant
        if self.flash_attn_varlen and not self.isolate_segments:
            raise ValueError("flash_attn_varlen isolates segments by construction; it cannot be combined with "
                             "isolate_segments=False (legacy_full_sequence): use attn_implementation sdpa or eager")
        if self.loss_normalization not in ("per_token", "per_example"):
            raise ValueError(f"loss_normalization must be per_token or per_example, got {self.loss_normalization!r}")
        if self.flash_attn_varlen:
            return self._with_weights(self._flattened(rows), [n for r in rows for n in r.seq_lens])
        length = max(len(r.input_ids) for r in rows)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((len(rows), length), dtype=torch.long)
        for b, r in enumerate(rows):
            n = len(r.input_ids)
            input_ids[b, :n] = torch.as_tensor(r.input_ids, dtype=torch.long)
            labels[b, :n] = torch.as_tensor(r.labels, dtype=torch.long)
            if not self.isolate_segments:  # legacy: one long sequence, nothing masked
                position_ids[b] = torch.arange(length, dtype=torch.long)
                continue
            seq_lens = list(r.seq_lens) + ([length - n] if length > n else [])
            position_ids[b] = _positions(seq_lens)
            labels[b, _starts(r.seq_lens)] = IGNORE_INDEX
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
        if self.loss_normalization == "per_example":
            batch["loss_weights"] = torch.stack(
                [_segment_weights(labels[b], list(r.seq_lens)) for b, r in enumerate(rows)]
            )
        return batch

    def _with_weights(self, batch: dict, seq_lens: list[int]) -> dict:
        if self.loss_normalization == "per_example":
            batch["loss_weights"] = _segment_weights(batch["labels"][0], seq_lens)[None]
        return batch

    def _flattened(self, rows: Sequence[PackedRow]) -> dict[str, torch.Tensor]:
        seq_lens = [n for r in rows for n in r.seq_lens]
        input_ids = torch.as_tensor([t for r in rows for t in r.input_ids], dtype=torch.long)[None]
        labels = torch.as_tensor([t for r in rows for t in r.labels], dtype=torch.long)[None]
        labels[0, _starts(seq_lens)] = IGNORE_INDEX
        cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.as_tensor(seq_lens, dtype=torch.int32), 0)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": _positions(seq_lens)[None],
            "cu_seq_lens_q": cu,
            "cu_seq_lens_k": cu,
            "max_length_q": max(seq_lens),
            "max_length_k": max(seq_lens),
        }


def _segment_weights(labels: torch.Tensor, seq_lens: Sequence[int]) -> torch.Tensor:
    """``1 / n_e`` on the trained labels of each segment (``n_e`` of them), 0 elsewhere; float32 ``[L]``.

    >>> _segment_weights(torch.tensor([-100, 5, 6, -100, 7, -100]), [3, 2]).tolist()
    [0.0, 0.5, 0.5, 0.0, 1.0, 0.0]
    """
    weights = torch.zeros(labels.shape, dtype=torch.float32)
    start = 0
    for n in seq_lens:
        trained = labels[start : start + n] != IGNORE_INDEX
        count = int(trained.sum())
        if count:
            weights[start : start + n][trained] = 1.0 / count
        start += n
    return weights


def _positions(seq_lens: Sequence[int]) -> torch.Tensor:
    """``[0..n0-1, 0..n1-1, ...]`` as int64."""
    return torch.cat([torch.arange(n, dtype=torch.long) for n in seq_lens])


def _starts(seq_lens: Sequence[int]) -> torch.Tensor:
    """Index of each segment's first token."""
    starts = torch.zeros(len(seq_lens), dtype=torch.long)
    starts[1:] = torch.cumsum(torch.as_tensor(seq_lens[:-1], dtype=torch.long), 0)
    return starts
