"""``attn_implementation: varlen``: exact packed attention on CUDA with PyTorch's own varlen kernel.

``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.9) runs Flash Attention over a flattened batch
of sequences described by ``cu_seq_lens`` (cumulative lengths), the layout ``flash_attention_2`` uses,
but ships inside PyTorch: no ``flash-attn`` package to build. Every segment attends causally to
itself only, with no ``L x L`` mask and ``sum(n_i^2)`` work.

Inputs, in order of preference:

* the flattened layout from ``PackedCollator(flash_attn_varlen=True)`` (what ``packlora train``
  sends for this backend): ``input_ids`` ``[1, T]`` plus ``cu_seq_lens_q/k`` (int32 ``[S + 1]``) and
  ``max_length_q/k`` (Python ints, so no device-to-host sync per layer), passed through the model to
  every attention layer;
* unflattened rows ``[B, L]`` whose ``position_ids`` restart per segment: the boundaries are found
  from the restarts (one host sync per layer), padding being its own segment;
* a 2-D ``attention_mask`` or a KV cache (left-padded generation, decoding during training): not a
  packed batch, so transformers' ``sdpa`` runs instead.

The kernel's signature changed between torch releases, so it is read at run time: causal masking
is ``is_causal=True`` (2.9, 2.10) or ``window_size=(-1, 0)`` (later); grouped-query attention uses
``enable_gqa`` where it exists and repeats the key/value heads otherwise; a ``scale`` other than
``head_dim ** -0.5`` is folded into the query where the kernel takes none.

Flash Attention takes bfloat16 or float16 tensors on CUDA. ``training/backends.py`` refuses this
backend up front without CUDA or without the kernel, naming the fix (``packed_sdpa`` or ``sdpa``).

Registered with ``transformers.AttentionInterface`` / ``AttentionMaskInterface`` on import.
"""
from __future__ import annotations

import functools
import inspect
import math

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from packlora.core.errors import InputError, StateError
from packlora.training.packed_attention import packed_sdpa_mask, segment_bounds

NAME = "varlen"
HALF_DTYPES = (torch.bfloat16, torch.float16)


def kernel():
    """``torch.nn.attention.varlen.varlen_attn``, looked up at call time (tests replace it).

    Raises:
        ImportError: this torch has no ``torch.nn.attention.varlen`` (added in torch 2.9).
    """
    from torch.nn.attention import varlen

    return varlen.varlen_attn


def missing_kernel_reason() -> str | None:
    """Why this torch cannot run ``attn_implementation: varlen`` (it has no varlen kernel), with the fix;
    None when it has one. Whether the machine has CUDA is the backend table's (``training/backends.py``)."""
    try:
        kernel()
    except (ImportError, AttributeError):
        return (f"model.attn_implementation: varlen needs torch.nn.attention.varlen.varlen_attn (torch >= 2.9), "
                f"and torch {torch.__version__} has none; upgrade torch, or use packed_sdpa (exact, any device) "
                "or flash_attention_2")
    return None


def unavailable_reason(cuda: bool) -> str | None:
    """Why ``attn_implementation: varlen`` cannot run on this machine, with the fix; None if it can."""
    from packlora.training.backends import cannot_train_here

    return cannot_train_here(NAME, cuda)


@functools.lru_cache(maxsize=8)
def _parameters(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def call_kernel(query, key, value, cu_seq_q, cu_seq_k, max_q: int, max_k: int, causal: bool, scale: float | None):
    """Run ``varlen_attn`` whatever its signature. ``query`` ``[T, H, D]``, ``key``/``value``
    ``[T, H_kv, D]`` with ``H % H_kv == 0``; returns ``[T, H, D]`` in the input dtype."""
    fn = kernel()
    params = _parameters(fn)
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if causal else (-1, -1)  # a tuple: the kernel compares with ==
    elif "is_causal" in params:
        kwargs["is_causal"] = causal
    elif causal:
        raise StateError(f"torch.nn.attention.varlen.varlen_attn{inspect.signature(fn)} takes neither window_size "
                           "nor is_causal, so causal attention cannot be asked for; use packed_sdpa")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # same head order as transformers' repeat_kv: query head h reads key/value head h // groups
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    default_scale = query.shape[-1] ** -0.5
    if scale is not None and "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None and not math.isclose(scale, default_scale, rel_tol=1e-6):
        query = query * (scale / default_scale)
    return fn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None,
                             sliding_window: int | None = None, **kwargs):
    """transformers' attention contract: ``query`` ``[B, H, L, D]``, ``key``/``value`` ``[B, H_kv, L, D]``;
    returns ``([B, L, H, D], None)``.

    Raises:
        ValueError: dropout > 0 in training, a sliding window, float32 tensors on CUDA, or
            ``cu_seq_lens_q`` given with several rows. (That ``cu_seq_lens_q`` ends at the row's
            length is checked once per forward by the isolation guard, not here in every layer.)
    """
    position_ids = kwargs.pop("position_ids", None)
    cu_q, cu_k = kwargs.pop("cu_seq_lens_q", None), kwargs.pop("cu_seq_lens_k", None)
    max_q, max_k = kwargs.pop("max_length_q", None), kwargs.pop("max_length_k", None)
    B, H, L, D = query.shape
    if attention_mask is not None or key.shape[2] != L:  # padding mask or KV cache: not a packed batch
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if dropout > 0:
        raise InputError(f"{NAME}: attention dropout {dropout} is not supported by torch's varlen kernel; set the "
                         "model's attention_dropout to 0 or use packed_sdpa")
    if sliding_window is not None:
        raise InputError(f"{NAME}: sliding-window attention (sliding_window={sliding_window}) is not supported; "
                         "use flash_attention_2 or sdpa for this model")
    if query.is_cuda and query.dtype not in HALF_DTYPES:
        raise InputError(f"{NAME}: Flash Attention takes bfloat16 or float16, got {query.dtype}; set model.dtype: "
                         "bfloat16 (or auto on CUDA)")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if cu_q is not None:
        cu_k = cu_q if cu_k is None else cu_k
        max_q = int(max_q) if max_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
        max_k = int(max_k) if max_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
        if B != 1 or cu_q.shape[0] < 2:
            raise ValueError(f"{NAME}: cu_seq_lens_q (shape {tuple(cu_q.shape)}) must describe one flattened row, but "
                             f"the batch has {B} rows; use PackedCollator(flash_attn_varlen=True)")
    else:
        if position_ids is None and L > 1:
            raise InputError(f"{NAME}: the attention layer {type(module).__name__} received neither cu_seq_lens_q nor "
                             "position_ids, so packed segments cannot be found; use sdpa for this architecture")
        positions = position_ids if position_ids is not None else torch.zeros(1, 1, dtype=torch.long)
        lens = [e - s for bounds in segment_bounds(positions.expand(B, -1)) for s, e in bounds]
        cu_q = cu_k = _cumulative(lens, query.device)
        max_q = max_k = max(lens)
    # [B, H, L, D] -> [B * L, H, D], contiguous as flash-attention's varlen entry points expect
    q = query.transpose(1, 2).reshape(B * L, H, D).contiguous()
    k = key.transpose(1, 2).reshape(B * L, key.shape[1], D).contiguous()
    v = value.transpose(1, 2).reshape(B * L, value.shape[1], D).contiguous()
    out = call_kernel(q, k, v, cu_q, cu_k, max_q, max_k, causal, scaling)
    return out.reshape(B, L, H, D), None


def _cumulative(lens: list[int], device) -> torch.Tensor:
    """``[0, n0, n0 + n1, ...]`` as int32 on ``device``.

    >>> _cumulative([3, 2, 1], "cpu").tolist()
    [0, 3, 5, 6]
    """
    cu = torch.zeros(len(lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lens, dtype=torch.int32), 0)
    return cu.to(device)


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                          window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None,
                          num_splits=None):
    """Per-segment ``scaled_dot_product_attention`` with the signature of torch 2.13's ``varlen_attn``:
    the stand-in that lets CPU tests and ``benchmarks/gpu_check.sh --dry-run`` run this backend's
    plumbing without CUDA. Never used for training. ``query`` ``[T, H, D]``; returns ``[T, H, D]``."""
    import torch.nn.functional as F

    if return_aux is not None or seqused_k is not None or block_table is not None:
        raise NotImplementedError("reference_varlen_attn: return_aux, seqused_k and block_table are not modelled")
    if tuple(window_size) not in ((-1, -1), (-1, 0)):
        raise NotImplementedError(f"reference_varlen_attn: window_size {window_size} is not modelled")
    if key.shape[1] != query.shape[1] and not enable_gqa:
        raise ValueError(f"Expect query and key/value to have the same number of heads but got Hq={query.shape[1]} "
                         f"and Hkv={key.shape[1]}. Try setting enable_gqa=True for GQA.")
    out = torch.empty_like(query)
    bounds_q, bounds_k = cu_seq_q.tolist(), cu_seq_k.tolist()
    for (sq, eq), (sk, ek) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        seg = F.scaled_dot_product_attention(
            query[sq:eq].transpose(0, 1)[None], key[sk:ek].transpose(0, 1)[None], value[sk:ek].transpose(0, 1)[None],
            is_causal=tuple(window_size) == (-1, 0), scale=scale, enable_gqa=enable_gqa,
        )
        out[sq:eq] = seg[0].transpose(0, 1)
    return out


AttentionInterface.register(NAME, varlen_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, packed_sdpa_mask)
