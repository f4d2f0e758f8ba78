"""Loss normalisation over a whole optimizer step (all accumulation micro-batches, all ranks).

``per_token`` (default): every trained token weighs the same::

    loss_step = sum_{t in step} ce_t / N_tokens,   N_tokens = trained labels in the step, all ranks

transformers (>= 4.46) already does this: ``Trainer._get_num_items_in_batch`` counts the trained
(shifted) labels of all micro-batches of the step and all-gathers them across ranks, the model's
loss divides its summed cross-entropy by that count, and the Trainer multiplies by the number of
processes to cancel DDP/DeepSpeed gradient averaging (``scale_wrt_gas=False`` under DeepSpeed).
packlora keeps that count and that scaling; with ``model.lm_head_positions: supervised`` (the
default) it takes the sum itself over the cross-entropy of the supervised positions only
(``training/lm_head.py``), with ``all`` the model's own loss does.

``per_example``: every example (packed segment) weighs the same, whatever its length::

    loss_step = sum_{e in step} (1 / n_e) sum_{t in e} ce_t / N_examples

where ``n_e`` is the number of trained labels of example ``e`` and ``N_examples`` the number of
examples with at least one trained label in the step, over all ranks. The collator sends
``loss_weights = 1 / n_e`` per trained label (so each example's weights sum to 1 and
``N_examples = sum(loss_weights)``); this mixin uses the weights as the numerator and their
gathered sum as the step's ``num_items_in_batch``. Both modes give the same gradient for
``1 row x accumulation 4``, ``4 rows x accumulation 1``, ``2 ranks x 2 rows`` and unpacked padded
batches (``tests/distributed/test_loss_invariance.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from packlora.data_utils.types import IGNORE_INDEX
from packlora.training.lm_head import kept_weights, supervised_token_ce

LOSS_NORMALIZATIONS = ("per_token", "per_example")


def weighted_causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, num_items) -> torch.Tensor:
    """``sum_t w_t * ce_t / num_items`` with the causal shift (logit ``t`` scores label ``t + 1``).

    Args:
        logits: ``[B, L, V]`` (any float dtype; computed in float32).
        labels: ``[B, L]`` int64, ``-100`` where untrained.
        weights: ``[B, L]`` float32, aligned with ``labels``.
        num_items: the step's normaliser (a tensor or number).
    """
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return (ce * weights[:, 1:].reshape(-1).to(ce.dtype)).sum() / num_items


class LossNormalizationMixin:
    """Trainer mixin: the step's loss under both normalisations and both ``lm_head_positions``.

    ``lm_head_positions = "supervised"`` (the default): the head and the cross-entropy run only at
    the positions whose next label trains (``training.lm_head.supervised_token_ce``), and the loss
    is ``sum_t w_t ce_t / num_items_in_batch`` here, with ``w_t = 1`` (``per_token``) or the
    collator's ``loss_weights`` (``per_example``): the same formula transformers' model loss applies
    to the full logits. ``"all"``: ``per_token`` takes transformers' own path (the model's loss on
    full logits), ``per_example`` ``weighted_causal_lm_loss`` on full logits.

    Under both, when ``num_items_in_batch`` is given, the loss is multiplied by the number of
    processes (``average_tokens_across_devices``) to cancel DeepSpeed's gradient averaging, as
    ``Trainer.compute_loss`` does. A micro-batch without any trained label gives a loss of 0.

    With ``supervised``, the ``outputs`` returned for ``return_outputs=True`` carry the ``[N]``
    per-position cross-entropy as ``logits`` (``supervised_token_ce``), not ``[B, L, V]`` logits.
    Nothing in packlora reads them: the evaluation loss comes from the kept positions
    (``PackloraTrainer.prediction_step``, ``token_row_loss_stats``), the runaway evaluation
    generates with the head's own forward, the label audit reads labels only, and there is no
    token-accuracy metric.

    Attributes:
        lm_head_positions: ``"supervised"`` or ``"all"`` (``model.lm_head_positions``).
        lm_head_chunk_tokens: positions per head chunk (None: ``training.lm_head.auto_chunk_tokens``).
    """

    lm_head_positions: str = "supervised"
    lm_head_chunk_tokens: int | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = inputs.pop("loss_weights", None)
        if self.lm_head_positions == "supervised":
            labels = inputs.pop("labels")
            ce, keep, outputs = supervised_token_ce(model, inputs, labels, self.lm_head_chunk_tokens)
            w = None if weights is None else kept_weights(weights, keep).to(ce.dtype)
            total = ce.sum() if w is None else (ce * w).sum()
            if num_items_in_batch is None:  # no step-wide count: this micro-batch's mean
                loss = _divide(total, ce.new_tensor(float(ce.numel())) if w is None else w.sum())
            else:
                loss = _divide(total, num_items_in_batch)
                if self.args.average_tokens_across_devices:
                    loss = loss * self.accelerator.num_processes  # cancels the ranks' gradient averaging
            return (loss, outputs) if return_outputs else loss
        if weights is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        if num_items_in_batch is None:  # evaluation of a single batch
            num_items_in_batch = weights.sum()
        loss = weighted_causal_lm_loss(outputs.logits, labels, weights, num_items_in_batch)
        if self.args.average_tokens_across_devices:
            loss = loss * self.accelerator.num_processes  # cancels the ranks' gradient averaging
        return (loss, outputs) if return_outputs else loss

    def _get_num_items_in_batch(self, batch_samples, device):
        if batch_samples and "loss_weights" in batch_samples[0]:
            n = sum(b["loss_weights"].sum() for b in batch_samples).to(device)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                n = self.accelerator.gather(n).sum()
            return n
        return super()._get_num_items_in_batch(batch_samples, device)


def _divide(total: torch.Tensor, count) -> torch.Tensor:
    """``total / count``, and 0 (not NaN) when nothing was trained (``total`` is then 0 too)."""
    count = torch.as_tensor(count, dtype=total.dtype, device=total.device)
    return total / count.clamp(min=torch.finfo(total.dtype).tiny)


def row_loss_stats(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per row, the numerator and denominator of the loss, so that an evaluation over many batches
    and ranks is normalised like training: ``loss = sum(num) / sum(den)`` over the whole set.

    ``per_token`` (``weights`` None): ``num`` = summed cross-entropy of the row's trained labels,
    ``den`` = their number. ``per_example`` (``weights`` = the collator's ``loss_weights``):
    ``num = sum_t w_t ce_t``, ``den = sum_t w_t`` = the row's examples. Either way the result does
    not depend on how examples were packed into rows (``tests/training/test_eval_loss.py``).

    Args:
        logits: ``[B, L, V]``; labels: ``[B, L]`` int64 (-100 untrained); weights: ``[B, L]`` float32.

    Returns:
        ``[B, 2]`` float64: ``(num, den)`` per row.
    """
    target = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none")
    w = (target != IGNORE_INDEX).to(ce.dtype) if weights is None else weights[:, 1:].to(ce.dtype)
    return torch.stack([(ce * w).sum(1), w.sum(1)], dim=1).double()


def token_row_loss_stats(ce: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``row_loss_stats`` from the per-position cross-entropy of the kept positions
    (``training.lm_head.supervised_token_ce``) instead of full logits: the same ``(num, den)``
    per row, a row without a trained label gives ``(0, 0)``.

    Args:
        ce: ``[N]`` float32, one per kept position, row-major; keep: ``[B, L]`` bool, the kept
            positions (``supervised_positions``); weights: ``[B, L]`` float32 ``loss_weights`` or None.

    Returns:
        ``[B, 2]`` float64.

    >>> keep = torch.tensor([[True, True, False], [False, False, False], [True, False, False]])
    >>> token_row_loss_stats(torch.tensor([1.0, 2.0, 4.0]), keep).tolist()
    [[3.0, 2.0], [0.0, 0.0], [4.0, 1.0]]
    """
    rows = keep.nonzero()[:, 0]
    w = torch.ones_like(ce) if weights is None else kept_weights(weights, keep).to(ce.dtype)
    stats = torch.zeros(keep.shape[0], 2, dtype=torch.float64, device=ce.device)
    stats[:, 0].index_add_(0, rows, (ce * w).double())
    stats[:, 1].index_add_(0, rows, w.double())
    return stats
