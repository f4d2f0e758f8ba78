"""Attention backends: one row per ``model.attn_implementation``, read by everyone who needs a fact.

=================== ========= ============ ========= =============== ============ ==========================
backend             CUDA only half only    flattened isolates by     CPU backward rows isolated
                                           batch     construction                 from position_ids
=================== ========= ============ ========= =============== ============ ==========================
sdpa                                                                  yes          yes (block-diagonal mask)
packed_sdpa                                                           yes          yes (SDPA per segment)
eager                                                                 yes          yes (block-diagonal mask)
varlen              yes       yes          yes       yes                          yes (restarts -> cu_seq_lens)
flash_attention_2   yes       yes          yes       yes                          one row only
flex_attention                                                        no           yes (block mask)
=================== ========= ============ ========= =============== ============ ==========================

Who reads which column:

* ``training/config.py``: ``half_precision_only`` refuses ``model.dtype: float32``;
  ``isolates_by_construction`` refuses ``data.labels: legacy_full_sequence`` (no isolation to remove).
* ``training/model.py check_attention_backend``: ``cuda_only``, ``cpu_backward`` and ``available`` refuse
  a backend this machine cannot train with, before any process starts. (A missing ``flash-attn``
  package for ``flash_attention_2`` is transformers' to report, when the model loads.)
* The recipe builds ``PackedCollator(flash_attn_varlen=spec.flattened_batch)``.
* ``training/isolation.py``: a packed batch of several rows without ``cu_seq_lens`` is refused for a
  backend whose ``rows_isolated_from_positions`` is False.

A new backend is one row here (and, if it is a kernel of packlora's own, a module that registers it
with ``transformers.AttentionInterface``, imported by ``training/model.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from packlora.core.errors import InputError


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendSpec:
    """What packlora needs to know about one attention backend.

    Attributes:
        name: the ``model.attn_implementation`` value (transformers' ``attn_implementation``).
        summary: one line for the config docs.
        cuda_only: cannot run without a CUDA GPU at all.
        half_precision_only: takes bfloat16 or float16 tensors only (Flash Attention).
        flattened_batch: trains on the collator's flattened ``[1, T]`` batch with ``cu_seq_lens``
            (``PackedCollator(flash_attn_varlen=True)``) instead of padded ``[B, L]`` rows.
        isolates_by_construction: segment boundaries are the kernel's own, so packed examples can never
            attend to each other, not even on purpose (``data.labels: legacy_full_sequence``).
        cpu_backward: torch has a backward for it on CPU (False: it cannot train on CPU).
        rows_isolated_from_positions: in a batch of several padded rows, segments are found from the
            restarting ``position_ids`` of each row. False: only one flattened row is isolated, so the
            collator must send ``cu_seq_lens``.
        needs: why it cannot train on CPU, completing "model.attn_implementation: NAME ..." (only for a
            backend that cannot).
        on_cpu: what to use instead on a machine without CUDA.
        available: ``"module:function"`` taking no argument and returning why the backend cannot run
            with this torch (with the fix), or None; checked before anything else. None: nothing to check.
    """

    name: str
    summary: str
    cuda_only: bool = False
    half_precision_only: bool = False
    flattened_batch: bool = False
    isolates_by_construction: bool = False
    cpu_backward: bool = True
    rows_isolated_from_positions: bool = True
    needs: str = ""
    on_cpu: str = "packed_sdpa (exact and fast on CPU) or sdpa"
    available: str | None = None

    @property
    def trains_on_cpu(self) -> bool:
        """Whether a training step can run without CUDA."""
        return not self.cuda_only and self.cpu_backward


BACKENDS: dict[str, BackendSpec] = {spec.name: spec for spec in (
    BackendSpec(name="sdpa", summary="PyTorch SDPA with the block-diagonal causal mask transformers builds from the "
                "restarting positions (the code default)"),
    BackendSpec(name="packed_sdpa", summary="SDPA run per packed segment, no mask: the fast exact choice on CPU "
                "(training/packed_attention.py)"),
    BackendSpec(name="eager", summary="transformers' eager attention with the block-diagonal mask"),
    BackendSpec(name="varlen", summary="PyTorch's own Flash Attention varlen kernel on the flattened batch; GPU, "
                "bf16/fp16, nothing to install (training/varlen_attention.py)",
                cuda_only=True, half_precision_only=True, flattened_batch=True, isolates_by_construction=True,
                cpu_backward=False, needs="runs Flash Attention, which needs a CUDA GPU",
                available="packlora.training.varlen_attention:missing_kernel_reason"),
    BackendSpec(name="flash_attention_2", summary="the flash-attn package's varlen kernel on the flattened batch; GPU",
                cuda_only=True, half_precision_only=True, flattened_batch=True, isolates_by_construction=True,
                cpu_backward=False, rows_isolated_from_positions=False,
                needs="runs the flash-attn package's kernels, which need a CUDA GPU"),
    BackendSpec(name="flex_attention", summary="FlexAttention with a block mask; trains on GPU only (torch has no "
                "FlexAttention backward on CPU)", cpu_backward=False,
                needs="cannot train on CPU (torch has no FlexAttention backward there)",
                on_cpu="packed_sdpa, sdpa or eager (flex_attention on GPU)"),
)}

AttnImplementation = Literal[tuple(BACKENDS)]  # type: ignore[valid-type]
"""The ``model.attn_implementation`` choices: the names of ``BACKENDS``."""


def backend(name: str) -> BackendSpec:
    """The row of ``name``.

    Raises:
        InputError: ``name`` is not a backend packlora knows; the message lists them.

    >>> backend("varlen").flattened_batch, backend("packed_sdpa").flattened_batch
    (True, False)
    """
    try:
        return BACKENDS[name]
    except KeyError:
        raise InputError(f"model.attn_implementation: {name!r} is not one of {list(BACKENDS)}") from None


def cannot_train_here(name: str, cuda: bool) -> str | None:
    """Why backend ``name`` cannot train on this machine (``cuda``: whether torch sees a GPU), with the
    fix; None when it can.

    >>> cannot_train_here("flex_attention", cuda=False)
    'model.attn_implementation: flex_attention cannot train on CPU (torch has no FlexAttention backward there); use packed_sdpa, sdpa or eager (flex_attention on GPU) on CPU'
    >>> cannot_train_here("packed_sdpa", cuda=False) is None
    True
    """
    spec = backend(name)
    if spec.available:
        import importlib

        module, _, function = spec.available.partition(":")
        reason = getattr(importlib.import_module(module), function)()
        if reason:
            return reason
    if cuda or spec.trains_on_cpu:
        return None
    return f"model.attn_implementation: {name} {spec.needs}, and this machine has none; use {spec.on_cpu} on CPU" \
        if spec.cuda_only else f"model.attn_implementation: {name} {spec.needs}; use {spec.on_cpu} on CPU"
