"""``attn_implementation: packed_sdpa``: SDPA run per packed segment, with no L x L mask.

transformers isolates packed rows for ``sdpa`` by building a block-diagonal ``[B, 1, L, L]`` mask from
the restarting ``position_ids``; with an explicit mask, PyTorch's SDPA cannot use its fused causal
kernels and falls back to a path that materialises ``L x L`` scores per head, so its cost grows
with the row length, not with the examples in it. ``packed_sdpa`` instead cuts each row at the
restarts and calls ``torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)`` on
every segment: no mask is built, the fused kernel is used, and the work is ``sum(n_i^2)`` instead
of ``L^2``. It is the varlen idea of flash-attention, in plain PyTorch, on any device. On the tiny
benchmark model (rows of 1024 tokens, attention a small share of the step) both isolated variants
run within a few percent of no isolation at all (``benchmarks/RESULTS.md``); the gap the mask
causes grows with ``L`` and with the model's attention share.

Exactness: every segment attends to itself only, with the same kernel an unpacked example would
use (``tests/data_utils/test_packed_attention.py`` checks logits and LoRA gradients). Whenever a
2-D ``attention_mask`` is given (generation with left padding, padded evaluation) or there is a
KV cache, it is exactly transformers' ``sdpa``.

Registered with ``transformers.AttentionInterface`` / ``AttentionMaskInterface`` on import.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from packlora.core.errors import InputError

NAME = "packed_sdpa"


def segment_bounds(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, ``(start, end)`` of each run of consecutive positions (a new segment starts wherever
    the position does not go up by one).

    >>> segment_bounds(torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]))
    [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]
    """
    L = position_ids.shape[-1]
    jumps = torch.ones(position_ids.shape, dtype=torch.bool, device=position_ids.device)
    jumps[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    out = []
    for row in jumps.cpu():
        starts = row.nonzero().flatten().tolist()
        out.append(list(zip(starts, starts[1:] + [L])))
    return out


def packed_sdpa_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Same contract as ``sdpa_attention_forward``: ``query`` ``[B, H, L, D]``, ``key``/``value``
    ``[B, H_kv, L, D]``; returns ``([B, L, H, D], None)``."""
    position_ids = kwargs.pop("position_ids", None)
    if attention_mask is None and position_ids is None and query.shape[2] > 1:
        raise InputError(
            f"{NAME}: the attention layer {type(module).__name__} received no position_ids, so packed segments "
            "cannot be found and isolation cannot be guaranteed; this architecture does not forward them. "
            "Use model.attn_implementation: sdpa"
        )
    packed = (
        attention_mask is None
        and position_ids is not None
        and query.shape[2] == key.shape[2] > 1  # no KV cache
        and position_ids.shape[-1] == query.shape[2]
    )
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    rows = []
    for b, bounds in enumerate(segment_bounds(position_ids.expand(query.shape[0], -1))):
        if len(bounds) == 1:
            pieces = [sdpa_attention_forward(module, query[b : b + 1], key[b : b + 1], value[b : b + 1], None,
                                             dropout=dropout, scaling=scaling, is_causal=True, **kwargs)[0]]
        else:
            pieces = [
                sdpa_attention_forward(module, query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e],
                                       None, dropout=dropout, scaling=scaling, is_causal=True, **kwargs)[0]
                for s, e in bounds
            ]
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0), None


def packed_sdpa_mask(*args, attention_mask=None, **kwargs):
    """No mask for packed or plain causal rows (segments come from ``position_ids``); transformers'
    SDPA mask whenever a 2-D padding mask is given."""
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(NAME, packed_sdpa_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, packed_sdpa_mask)
