"""Refuse model inputs under which packed examples would attend to each other.

packlora isolates packed examples through ``position_ids`` that restart at 0 in every segment:
transformers turns restarts into a block-diagonal causal mask (sdpa, eager, flex_attention) or
varlen boundaries (flash-attention 2), but only for some input combinations. Measured on
transformers 5.24 (``../shared/ENVIRONMENT.md``, ``tests/data_utils/test_packed_attention.py``):

| inputs with restarting ``position_ids``             | isolated? | what the guard does |
|-----------------------------------------------------|-----------|---------------------|
| no ``attention_mask``, ``use_cache=False``           | yes       | pass |
| any ``attention_mask`` (2-D padding mask or 4-D)     | no / only some 4-D float masks | raise |
| ``use_cache=True`` or ``past_key_values``            | no (a cache disables packed masks) | raise |
| flash-attention 2, several rows, no ``cu_seq_lens``   | no (varlen only for one flattened row) | raise |
| ``cu_seq_lens_q`` not ending at the row's length, or several rows | no | raise |

Install it once with ``install_isolation_guard(model)``; it is a forward pre-hook, so it also
checks what a caller passes outside the Trainer. Inputs without restarts (ordinary unpacked
batches) are never touched.
"""
from __future__ import annotations

import torch

from packlora.core.errors import InputError
from packlora.training.backends import BACKENDS


class PackedInputError(InputError):
    """Inputs that would let packed examples attend across their boundaries."""


def has_restarts(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> bool:
    """True if, between two real tokens of a row, positions do not go up by exactly one (a packed row).

    With a 2-D ``attention_mask``, transitions into or out of padding are ignored, so the positions
    ``generate`` gives a left-padded row (``[1, 1, 0, 1, 2]`` for ``mask [0, 0, 1, 1, 1]``) are not packed.

    >>> has_restarts(torch.tensor([[0, 1, 2, 0, 1]])), has_restarts(torch.tensor([[0, 1, 2, 3]]))
    (True, False)
    >>> has_restarts(torch.tensor([[1, 1, 0, 1, 2]]), torch.tensor([[0, 0, 1, 1, 1]]))
    False
    """
    if position_ids is None or position_ids.shape[-1] < 2:
        return False
    jumps = position_ids[..., 1:] - position_ids[..., :-1] != 1
    if attention_mask is not None and attention_mask.dim() == 2:
        real = attention_mask.bool()
        jumps = jumps & real[..., 1:] & real[..., :-1]
    return bool(jumps.any())


def check_packed_inputs(kwargs: dict, attn_implementation: str | None, default_use_cache: bool = False) -> None:
    """Raise ``PackedInputError`` if ``kwargs`` (a model forward's keyword arguments) hold packed
    ``position_ids`` together with something that breaks isolation. See the module table.

    ``default_use_cache`` is the model config's ``use_cache``, used when ``kwargs`` does not say."""
    _check_cu_seq_lens(kwargs)
    position_ids = kwargs.get("position_ids")
    if position_ids is None or not has_restarts(position_ids, kwargs.get("attention_mask")):
        return
    if kwargs.get("attention_mask") is not None:
        raise PackedInputError(
            "packed batch (position_ids restart inside a row) was given an attention_mask; transformers then "
            "ignores the segment boundaries and examples attend to each other. Drop attention_mask "
            "(packlora's PackedCollator never sends one; padding is isolated as its own segment)"
        )
    use_cache = kwargs.get("use_cache")
    if (default_use_cache if use_cache is None else use_cache) or kwargs.get("past_key_values") is not None:
        raise PackedInputError(
            "packed batch with use_cache=True or past_key_values: a KV cache disables transformers' packed "
            "block-diagonal mask. Pass use_cache=False for packed forward passes"
        )
    spec = BACKENDS.get(attn_implementation or "")
    if spec is not None and not spec.rows_isolated_from_positions:
        if position_ids.shape[0] > 1 and kwargs.get("cu_seq_lens_q") is None:
            raise PackedInputError(
                f"flash-attention packed batch has {position_ids.shape[0]} rows and no cu_seq_lens_q; varlen "
                "boundaries only apply to one flattened row. Use PackedCollator(flash_attn_varlen=True)"
            )


def _check_cu_seq_lens(kwargs: dict) -> None:
    """The flattened layout (``flash_attention_2``, ``varlen``): one row whose length ``cu_seq_lens_q``
    ends at, so every token belongs to exactly one segment. One host sync per forward pass."""
    cu = kwargs.get("cu_seq_lens_q")
    ids = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    if cu is None or ids is None:
        return
    rows, length = ids.shape[0], ids.shape[1]
    end = int(cu[-1])
    if rows != 1 or end != length:
        raise PackedInputError(
            f"cu_seq_lens_q ends at {end} but the batch is {rows} row(s) of {length} tokens; the flattened layout "
            "is one row holding every segment. Use PackedCollator(flash_attn_varlen=True)"
        )


def install_isolation_guard(model) -> None:
    """Register ``check_packed_inputs`` as a forward pre-hook on every transformers ``PreTrainedModel``
    inside ``model`` that has its own ``forward`` (the causal-LM wrapper), once."""
    from transformers import PreTrainedModel

    target = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if target is None or getattr(target, "_packlora_guard", False):
        return
    attn = getattr(target.config, "_attn_implementation", None)

    def hook(module, args, kwargs):
        check_packed_inputs(kwargs, attn, bool(getattr(module.config, "use_cache", False)))

    target.register_forward_pre_hook(hook, with_kwargs=True)
    target._packlora_guard = True
