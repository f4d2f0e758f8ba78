"""The LM head (vocabulary projection) and the cross-entropy only where a label trains, in chunks.

packlora trains assistant replies only: on the bundled 世说新语 chats about 20% of a packed row's
positions carry a label. A plain causal-LM forward projects every position onto the vocabulary
and keeps ``[tokens x vocab]`` float32 logits for the backward (2.3 GiB for one 4,096-token row at
Qwen2's 151,936 ids), then throws 80% of them away in the loss. With
``model.lm_head_positions: supervised`` (the default) one forward pass does this instead::

    labels            -100 -100   a2   a3 -100 -100   b2 -100     (not shifted; the model shifts)
    keep[t]              F    T    T    F    F    T    F    F     keep[t] = labels[t + 1] != -100
    hidden [B, L, H]  --logits_to_keep=keep-->  [N, H]  --lm_head, C positions at a time-->  CE [N]

1. The model's own forward selects the kept positions: transformers' ``logits_to_keep`` takes a
   2-D boolean ``[B, L]`` mask and flattens the hidden states to ``[N, H]`` before its head
   (``transformers.modeling_utils.slice_logits_to_keep``, used by every causal LM of transformers 5).
   The mask is per row, so batches of several rows keep different positions and counts.
2. The model calls its head module once, as always: ZeRO-3 gathers the head's weight once for the
   whole call (and again before its backward), a PEFT LoRA on ``lm_head`` runs, tied input/output
   embeddings are the same ``Parameter``. Only for that one call, the module's ``forward`` is
   replaced (``head_returns_token_ce``): the original ``forward`` projects ``C`` kept positions at a
   time and each chunk's cross-entropy is taken in float32 (``chunked_token_ce``). The call returns
   the per-position cross-entropy ``[N]`` (float32), which the model hands back as ``outputs.logits``.
3. No chunk's logits outlive it. A frozen head (the LoRA default) needs only each position's
   ``d ce / d hidden`` (``[N, H]``) for the backward, computed chunk by chunk in the forward
   (``_FrozenHeadTokenCE``: ``softmax - onehot`` by hand, taken back through the head's
   ``forward`` by autograd); a head that trains runs each chunk under ``torch.utils.checkpoint``
   and recomputes its logits in the backward.

So the head + loss hold ``O(C x V)`` memory, whatever the row length, and do the head's matmuls
for ``N`` positions instead of ``B x L`` (a head that trains recomputes each chunk's forward once).

Each position's logits are the same row of the same matmul, and its cross-entropy is the one
``transformers.loss.loss_utils.ForCausalLMLoss`` takes (float32, ``ignore_index`` -100): only the
order of the final sum differs (``tests/training/test_lm_head.py``: loss to 1e-6, LoRA gradients
to 1e-5 relative, against ``lm_head_positions: all``).

Method: projecting only the positions whose next-token label is not -100 is what TRL's
``add_fused_lm_head`` does (``trl/trainer/utils.py``, TRL 1.16; it reads ``lm_head.weight`` directly
and tiles the vocabulary). Splitting the positions into chunks, each ``lm_head`` + loss on its own,
is torchtitan's ``ChunkedLossWrapper`` (``torchtitan/components/loss.py``). Taking the gradient in
the forward, chunk by chunk, and scaling it in the backward is Liger Kernel's fused linear
cross-entropy (Hsu et al., arXiv 2410.10989). Never materialising the logits is the aim of Cut
Cross-Entropy (Wijmans et al., arXiv 2411.09009), which tiles the vocabulary inside a kernel.
packlora chunks positions and lets autograd differentiate the head's own ``forward`` (no
hand-written gradient) because the head must run as its module: a LoRA on ``lm_head`` or another
wrapper is then part of the computation, and nothing reads the weight behind ZeRO-3's back.
"""
from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from packlora.core.errors import InputError
from packlora.data_utils.types import IGNORE_INDEX

LmHeadPositions = Literal["supervised", "all"]
LM_HEAD_POSITIONS = ("supervised", "all")



class LmHeadError(InputError):
    """This model cannot take ``model.lm_head_positions: supervised`` (it has no output embeddings,
    its forward ignores a boolean ``logits_to_keep``, or it rescales its logits after the head); the
    message names the model and the fix (``model.lm_head_positions: all``)."""


CHUNK_BYTES = 64 * 2**20
"""Default size of one chunk's float32 logits (64 MiB: 110 positions at Qwen2's 151,936 ids,
512 at a 32,768-id vocabulary); ``auto_chunk_tokens``."""


def auto_chunk_tokens(vocab_size: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Positions per chunk so that one chunk's float32 logits take at most ``budget_bytes``
    (at least 1).

    >>> auto_chunk_tokens(151_936), auto_chunk_tokens(32_768), auto_chunk_tokens(10**9)
    (110, 512, 1)
    """
    return max(1, budget_bytes // (4 * vocab_size))


def supervised_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions whose logits a loss reads, and the labels they are scored against.

    Labels are not shifted (``data_utils/types.py``): the logit at ``t`` scores ``labels[t + 1]``.

    Args:
        labels: ``[B, L]`` int64, ``-100`` where untrained.

    Returns:
        ``keep``: ``[B, L]`` bool, ``keep[b, t] = labels[b, t + 1] != -100`` (the last position is
        never kept); ``target``: ``[N]`` int64, the kept positions' next labels in row-major order
        (the order of ``hidden[keep]``), ``N = keep.sum()``.

    >>> keep, target = supervised_positions(torch.tensor([[-100, -100, 5, 6, -100, 7], [-100, 8, -100, -100, -100, -100]]))
    >>> keep.int().tolist(), target.tolist()
    ([[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0]], [5, 6, 7, 8])
    """
    target = labels[:, 1:]
    trained = target != IGNORE_INDEX
    keep = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    keep[:, :-1] = trained
    return keep, target[trained]


def kept_weights(weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``[N]``: the per-label ``loss_weights`` (``[B, L]``, aligned with ``labels``) of the kept
    positions, in the order of ``supervised_positions``' ``target``."""
    return weights[:, 1:][keep[:, :-1]]


def _token_ce(forward, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(forward(hidden).float(), target, ignore_index=IGNORE_INDEX, reduction="none")


def _spans(n: int, chunk_tokens: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_tokens, n)) for s in range(0, n, chunk_tokens)] or [(0, 0)]


def _ce_and_logit_grad(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy of ``logits`` ``[n, V]`` (taken in float32) and its gradient with
    respect to the logits, ``softmax(logits) - onehot(target)`` (0 where the target is -100), in
    one exponential pass: ``m = max``, ``p = exp(logits - m)``, ``s = sum p``, ``ce = m + log s -
    logits[target]``, ``p / s - onehot``. The same quantities as ``F.cross_entropy`` and its
    backward (``log_softmax`` then ``nll_loss``), without their extra passes over ``[n, V]``.
    ``logits`` is not modified.

    Returns:
        ``ce`` ``[n]`` float32 and the gradient ``[n, V]`` in ``logits``' dtype.
    """
    x = logits.float()
    valid = target != IGNORE_INDEX
    rows = torch.arange(x.shape[0], device=x.device)
    safe = target.clamp(min=0)
    m = x.amax(dim=-1, keepdim=True)
    p = (x - m).exp_()
    s = p.sum(dim=-1, keepdim=True)
    ce = (m + s.log()).squeeze(-1) - x[rows, safe]
    p.div_(s)
    p[rows, safe] -= 1.0
    p.mul_(valid[:, None])
    return torch.where(valid, ce, torch.zeros_like(ce)), p.to(logits.dtype)


class _FrozenHeadTokenCE(torch.autograd.Function):
    """Per-row cross-entropy of a head without trainable parameters; each chunk's gradient with
    respect to its hidden states is taken in the forward, so the backward recomputes nothing.

    Row ``t``'s loss depends on ``hidden[t]`` alone, so ``d ce_t / d hidden[t]`` (``[N, H]``, small)
    is all the backward needs: it returns ``grad_ce[t] * d ce_t / d hidden[t]``. Per chunk, the
    gradient with respect to the logits is written by hand (``_ce_and_logit_grad``) and taken back
    through the head's own ``forward`` by autograd (``torch.autograd.grad`` with it as
    ``grad_outputs``). This is how Liger Kernel's fused linear cross-entropy avoids keeping logits
    (gradients computed chunk by chunk in the forward, scaled by the upstream gradient in the
    backward; Hsu et al., arXiv 2410.10989), here through the module instead of a kernel.
    """

    @staticmethod
    def forward(ctx, hidden, target, forward, chunk_tokens):
        ces, grads = [], []
        for s, e in _spans(hidden.shape[0], chunk_tokens):
            with torch.enable_grad():
                h = hidden[s:e].detach().requires_grad_()
                logits = forward(h)
            ce, grad_logits = _ce_and_logit_grad(logits.detach(), target[s:e])
            (g,) = torch.autograd.grad(logits, h, grad_outputs=grad_logits)
            ces.append(ce)
            grads.append(g)
            del logits, grad_logits
        ctx.save_for_backward(grads[0] if len(grads) == 1 else torch.cat(grads))
        return ces[0] if len(ces) == 1 else torch.cat(ces)

    @staticmethod
    def backward(ctx, grad_ce):
        (dce_dhidden,) = ctx.saved_tensors
        return grad_ce[:, None].to(dce_dhidden.dtype) * dce_dhidden, None, None, None


def chunked_token_ce(forward, hidden: torch.Tensor, target: torch.Tensor, chunk_tokens: int,
                     trainable_head: bool = False) -> torch.Tensor:
    """Cross-entropy of ``forward(hidden)`` against ``target``, ``chunk_tokens`` rows at a time, so
    at most ``[chunk_tokens, V]`` logits exist at once.

    The gradient, when one is needed (grad mode on and ``hidden`` requires grad, or the head trains):

    * a frozen head (``trainable_head`` False: the LoRA default, the head or the tied embedding
      frozen): ``_FrozenHeadTokenCE``, each chunk's gradient with respect to its hidden states
      computed in the forward and scaled in the backward (no recomputation);
    * a head with trainable parameters (a LoRA on ``lm_head``, full fine-tuning): each chunk under
      ``torch.utils.checkpoint(use_reentrant=False)``, its logits freed after its loss and
      recomputed in the backward, where autograd reaches the head's parameters (the RNG state is
      replayed, so a LoRA dropout draws the same mask).

    Args:
        forward: the head, ``[n, H] -> [n, V]`` logits (any float dtype; the loss is float32).
        hidden: ``[N, H]``; target: ``[N]`` int64 (``-100`` scores 0).
        chunk_tokens: rows per chunk, >= 1.
        trainable_head: whether ``forward`` has parameters that require grad.

    Returns:
        ``[N]`` float32, one cross-entropy per row (in nats). ``N = 0`` gives an empty tensor that
        is still part of the graph, so a backward through it gives zero gradients, not an error.
    """
    if not torch.is_grad_enabled() or not (hidden.requires_grad or trainable_head):
        parts = [_token_ce(forward, hidden[s:e], target[s:e]) for s, e in _spans(hidden.shape[0], chunk_tokens)]
    elif not trainable_head:
        return _FrozenHeadTokenCE.apply(hidden, target, forward, chunk_tokens)
    else:
        parts = [checkpoint(_token_ce, forward, hidden[s:e], target[s:e], use_reentrant=False)
                 for s, e in _spans(hidden.shape[0], chunk_tokens)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def output_head(model) -> torch.nn.Module:
    """The module the model calls as its LM head (``get_output_embeddings()``), through a
    DeepSpeed engine, DDP or a PEFT model (a LoRA on ``lm_head`` gives the LoRA layer).

    Raises:
        LmHeadError: the model has no output embeddings.
    """
    inner = model
    while not hasattr(inner, "get_output_embeddings") and hasattr(inner, "module"):
        inner = inner.module  # DeepSpeedEngine, DistributedDataParallel
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None:
        raise LmHeadError(f"{type(inner).__name__} has no output embeddings (get_output_embeddings() is None); "
                         "model.lm_head_positions: supervised needs a causal LM head: set it to all")
    return head


def prepare_head_for_zero3(model) -> bool:
    """Under DeepSpeed ZeRO-3, make a head that has parameterised submodules of its own (a PEFT
    LoRA layer on ``lm_head``: ``base_layer``, ``lora_A``, ``lora_B``) a DeepSpeed *leaf module*.
    Call before the DeepSpeed engine exists (``PackloraTrainer.__init__`` does).

    Why: ZeRO-3 gathers a module's parameters in a hook on every call of that module, and a gather
    is a collective all ranks must enter together. The chunked head calls its submodules once per
    chunk, and the number of chunks follows each rank's number of trained labels, so two ranks
    would enter different numbers of gathers and deadlock (gloo: "Received data size doesn't match
    expected size"). A leaf module gathers all of its parameters, submodules included, once per
    call of the module itself (``deepspeed.utils.set_z3_leaf_module``, the mechanism DeepSpeed has for
    mixture-of-experts blocks), and reduces their gradients after its own backward. A plain
    ``nn.Linear`` head has no submodules and is left alone (its chunks call ``forward`` directly,
    no hook, no collective); so is everything when ZeRO-3 is off.

    Returns:
        True if the head was marked.
    """
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return False
    head = output_head(model)
    if not any(True for child in head.children() for _ in child.parameters()):
        return False
    from deepspeed.utils import set_z3_leaf_module

    set_z3_leaf_module(head, True)
    return True


@contextlib.contextmanager
def head_returns_token_ce(head: torch.nn.Module, target: torch.Tensor, chunk_tokens: int | None = None):
    """While active, calling ``head`` on ``[N, H]`` hidden states returns their ``[N]`` float32
    cross-entropy against ``target`` (``chunked_token_ce`` over the head's own ``forward``) instead
    of logits. The module is still called through ``__call__``, so its hooks (ZeRO-3 gather and
    release, PEFT) run once per call as before.

    Args:
        head: the LM head module (``output_head``).
        target: ``[N]`` int64, the labels of the rows the head will be called on.
        chunk_tokens: rows per chunk; None: ``auto_chunk_tokens`` of the head's ``out_features``.

    Raises:
        LmHeadError (from the call): the head got other than ``[N, H]``, i.e. the model did not
            select the positions with a 2-D boolean ``logits_to_keep``.
    """
    if chunk_tokens is None:
        vocab = getattr(head, "out_features", None) or getattr(getattr(head, "weight", None), "ds_shape", [0])[0]
        chunk_tokens = auto_chunk_tokens(int(vocab) or 1)
    trainable = any(p.requires_grad for p in head.parameters())
    original = head.forward
    own = "forward" in head.__dict__  # an instance-level forward (e.g. an accelerate hook) to put back
    returned: list[torch.Tensor] = []  # what the head returned, for supervised_token_ce's check

    def forward(hidden, *args, **kwargs):
        if hidden.dim() != 2 or hidden.shape[0] != target.shape[0]:
            raise LmHeadError(
                f"lm_head_positions: supervised: the LM head got hidden states of shape {tuple(hidden.shape)}, "
                f"expected [{target.shape[0]}, hidden]; this model's forward does not select positions with a 2-D "
                "boolean logits_to_keep (transformers' slice_logits_to_keep). Set model.lm_head_positions: all"
            )
        returned.append(chunked_token_ce(lambda x: original(x, *args, **kwargs), hidden, target, chunk_tokens,
                                         trainable))
        return returned[-1]

    head.forward = forward
    try:
        yield returned
    finally:
        if own:
            head.forward = original
        else:
            del head.forward


def supervised_token_ce(model, inputs: dict, labels: torch.Tensor, chunk_tokens: int | None = None):
    """One forward pass of ``model`` on ``inputs`` (no ``labels`` in them) that projects and scores
    only the supervised positions (module docstring).

    Args:
        model: a causal LM, possibly inside PEFT / DeepSpeed / DDP; its forward takes ``logits_to_keep``.
        inputs: the model's keyword arguments (``input_ids``, ``position_ids``, ...).
        labels: ``[B, L]`` int64, not shifted, ``-100`` where untrained.
        chunk_tokens: positions per chunk (None: ``auto_chunk_tokens``).

    Returns:
        ``(ce, keep, outputs)``: ``ce`` ``[N]`` float32, the cross-entropy of each kept position in
        the order of ``supervised_positions``; ``keep`` ``[B, L]`` bool; ``outputs`` the model's
        output, whose ``logits`` is ``ce`` (not ``[B, L, V]`` logits: a metric that wants logits
        takes them from a forward without this function, as the runaway evaluation's ``generate`` does).

    Raises:
        LmHeadError: the model has no output embeddings, ignores the boolean ``logits_to_keep``, or
            changes what its head returned; the fix is ``model.lm_head_positions: all``.
    """
    keep, target = supervised_positions(labels)
    with head_returns_token_ce(output_head(model), target, chunk_tokens) as returned:
        outputs = model(**inputs, logits_to_keep=keep)
    ce = outputs.logits
    # The model must hand back what its head returned (ZeRO-3's hooks may wrap it in a view of the
    # same storage): a model that rescales logits after its head (Gemma-2's final_logit_softcapping,
    # Cohere's logit_scale, Granite's logits_scaling) would otherwise rescale the cross-entropy.
    if len(returned) != 1 or ce.shape != returned[0].shape or ce.data_ptr() != returned[0].data_ptr():
        raise LmHeadError(
            f"lm_head_positions: supervised: {type(output_head(model)).__name__} was called {len(returned)} time(s) "
            "and the model changed what it returned (it post-processes its logits, e.g. final_logit_softcapping, "
            "logit_scale or logits_scaling); packlora cannot score such a head in chunks. Set "
            "model.lm_head_positions: all"
        )
    return ce, keep, outputs
