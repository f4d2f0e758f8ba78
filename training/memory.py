"""How much memory one rank's micro-batch needs for the logits and the activations, before step 1.

Rank 0 logs it at start-up (``TrainingRecipe``), so a configuration that cannot fit is visible
before the out-of-memory killer ends it (``packlora launch`` then says so: ``launcher.commands.OOM_HINT``).

**Logits** (``logits_bytes``): for ``P`` positions projected by the LM head per micro-batch and a
vocabulary of ``V`` ids, in a model dtype of ``b`` bytes::

    P x V x (b + 12) bytes

the logits themselves (``b``), the float32 log-softmax that cross-entropy keeps for the backward
pass (4), and, in the backward pass, the float32 gradients of the log-softmax and of the logits
(4 + 4): transformers 5.24's ``ForCausalLMLoss`` upcasts the logits to float32 before
``cross_entropy``. Measured as the growth of the peak resident memory of one forward and backward
pass on CPU (torch 2.13) with ``V`` = 151,936 and 2,048 or 4,096 positions: 16.0 bytes per element in
float32 and 14.0 in bfloat16. This is ``model.lm_head_positions: all`` (transformers' LM head):
every position is projected, ``P`` = rows x ``max_seq_length``.

With ``model.lm_head_positions: supervised`` (the default, ``training/lm_head.py``) the head projects
the supervised positions one chunk of ``C`` positions at a time (``model.lm_head_chunk_tokens``, or
``auto_chunk_tokens``: 110 at 151,936 ids) and frees each chunk's logits before the next, so only
one chunk is alive: ``P`` = min(``C``, rows x (``max_seq_length`` - 1)), whatever the number of rows,
and the bytes per element are those of the chunk's peak (``CHUNK_BYTES_PER_LOGIT``)::

    P x V x CHUNK_BYTES_PER_LOGIT[b, head trains]

Measured as the growth of the peak resident memory (``VmHWM`` after a reset) of one forward and
backward pass of ``head_returns_token_ce`` on CPU (torch 2.13, one thread), ``V`` = 151,936, hidden
128, the slope between chunks of 64 and 192 positions (``benchmarks/lm_head_memory.py``, figures in
``benchmarks/RESULTS.md``): a frozen head (the LoRA default) 8 bytes per element in float32 and 12-13
in bfloat16 (the chunk's logits, the float32 copy and softmax, the logit gradient in the model
dtype), a head that trains (a LoRA on ``lm_head``, ``lora: null``; each chunk recomputed in the
backward) 10 and 10-14 (the allocator's reuse moves the bfloat16 figures between runs). The table
holds the largest figure seen, so the estimate does not undercount. fp16 is taken as bfloat16 (the
same code path).

**Activations** (``activation_bytes``): what autograd keeps for the backward pass, per token and
decoder layer of a Llama/Qwen2-style layer (RMSNorm, rotary positions, SwiGLU MLP of width ``I``,
``heads`` query heads of width ``d``, key/value heads of total width ``kv``), counted tensor by
tensor as Korthikanti et al. 2022 do for GPT ("Reducing Activation Recomputation in Large
Transformer Models", arXiv:2205.05198, section 4.1), in elements of ``b`` bytes::

    4h + 3I + 2kv + heads + d     the frozen layer, for the gradient to flow through it: the
                                  norms' inputs, q/k/v and the attention output and statistics
                                  the kernel keeps, the MLP's gate, up and SiLU outputs
    + h   if any of q_proj, k_proj, v_proj is adapted (their shared normalised input)
    + h   if o_proj is adapted; + h if gate_proj or up_proj is; + I if down_proj is
    + r   per adapted module (the LoRA A output)
    + L + 2d        with sdpa (the block mask of a row of L tokens)
    + heads x L + 2d   with eager (the attention probabilities); nothing more with packed_sdpa or varlen
    + 5h + I        instead of the LoRA terms when every parameter trains (lora: null)

and, with LoRA dropout, each adapted module's dropped-out input, about ``b + 1`` bytes per element.
The terms were counted on the tensors autograd really saves
(``torch.autograd.graph.saved_tensors_hooks``, weights excluded, rows whose positions restart) for
transformers 5.24's Qwen2 layer on CPU, and are checked within 5% on shapes and adapter sets other
than the ones they were counted on (``tests/training/test_memory.py``). Not included: weights,
gradients and optimizer states (ZeRO partitions those), nor the temporaries of one layer's
backward pass.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

GiB = 1024**3
LOGITS_EXTRA_BYTES = 12
"""float32 log-softmax + its gradient + the logits' gradient, per logit element (see the module docstring)."""
CHUNK_BYTES_PER_LOGIT = {(4, False): 8, (4, True): 10, (2, False): 13, (2, True): 14}
"""``(dtype bytes, head trains) -> bytes`` per element of one chunk of the supervised head, at its
peak: the largest measured (``benchmarks/lm_head_memory.py``; see the module docstring)."""
_QKV, _GATE_UP, _DOWN = {"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"down_proj"}


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Estimated bytes one rank needs for one micro-batch (see the module docstring)."""

    logits_bytes: int
    """The LM head's logits, their float32 log-softmax and both gradients (of one chunk when
    ``lm_head_positions`` is ``supervised``)."""
    activation_bytes: int
    """What autograd keeps between the forward and the backward pass in the decoder layers."""
    positions: int
    """Positions the LM head holds logits for at once: every token (``all``) or one chunk (``supervised``)."""
    tokens: int
    """Tokens per micro-batch (rows x ``max_seq_length``)."""
    vocab_size: int
    dtype_bytes: int
    bytes_per_logit: int
    """Bytes per logit element: ``dtype_bytes + 12`` (``all``) or ``CHUNK_BYTES_PER_LOGIT`` (``supervised``)."""
    lm_head_positions: str = "all"
    """``model.lm_head_positions``: ``all`` or ``supervised``."""

    def describe(self) -> str:
        """One log line, the figures in GiB with the numbers they come from."""
        where = ("every position" if self.lm_head_positions == "all" else
                 "model.lm_head_positions: supervised, one chunk at a time")
        return (f"estimated memory per rank for one micro-batch: logits {self.logits_bytes / GiB:.2f} GiB "
                f"({where}: {self.positions} positions x {self.vocab_size} ids x {self.bytes_per_logit} "
                f"bytes), activations {self.activation_bytes / GiB:.2f} GiB ({self.tokens} tokens); weights, "
                "gradients and optimizer states come on top (training/memory.py)")


def logits_bytes(positions: int, vocab_size: int, dtype_bytes: int) -> int:
    """``positions x vocab_size x (dtype_bytes + 12)``: see the module docstring.

    >>> logits_bytes(8 * 1024, 151936, 4) / 1024**3   # 8 rows of 1,024 tokens, Qwen2's vocabulary, fp32
    18.546875
    """
    return positions * vocab_size * (dtype_bytes + LOGITS_EXTRA_BYTES)


def activation_bytes(model_config: Any, tokens: int, row_length: int, dtype_bytes: int, attn_implementation: str,
                     lora_r: int | None, lora_modules: Sequence[str] = (), lora_dropout: float = 0.0) -> int:
    """What autograd keeps for ``tokens`` tokens in rows of ``row_length`` (see the module docstring).

    Args:
        model_config: a ``transformers`` config with ``hidden_size``, ``num_hidden_layers``,
            ``num_attention_heads``; ``intermediate_size`` (default ``4 * hidden_size``),
            ``num_key_value_heads`` and ``head_dim`` when the model has them.
        lora_r: the LoRA rank, or None for full fine-tuning (every parameter trains).
        lora_modules: the adapted module names (``lora.target_modules``); names other than the
            Llama/Qwen2 projections count as taking a ``hidden_size`` input.
    """
    c = model_config
    h, layers, heads = c.hidden_size, c.num_hidden_layers, c.num_attention_heads
    inter = getattr(c, "intermediate_size", None) or 4 * h
    head_dim = getattr(c, "head_dim", None) or h // heads
    kv = (getattr(c, "num_key_value_heads", None) or heads) * head_dim
    per_token = 4 * h + 3 * inter + 2 * kv + heads + head_dim
    masked = {"sdpa": row_length, "eager": heads * row_length}
    if attn_implementation in masked:
        per_token += masked[attn_implementation] + 2 * head_dim
    mods = set(lora_modules)
    dropped = 0
    if lora_r is None:
        per_token += 5 * h + inter
    else:
        per_token += h * (bool(mods & _QKV) + ("o_proj" in mods) + bool(mods & _GATE_UP)) + inter * bool(mods & _DOWN)
        per_token += h * len(mods - _QKV - _GATE_UP - _DOWN - {"o_proj"}) + lora_r * len(mods)
        if lora_dropout > 0:
            dropped = sum(inter if m in _DOWN else h for m in mods) * (dtype_bytes + 1)
    return layers * tokens * (per_token * dtype_bytes + dropped)


def head_trains(lora: Any) -> bool:
    """Whether the LM head has trainable parameters: full fine-tuning (``lora`` None) or a LoRA on ``lm_head``."""
    return lora is None or "lm_head" in lora.target_modules


def estimate_memory(model_config: Any, *, micro_batch: int, max_seq_length: int, dtype_bytes: int,
                    attn_implementation: str, lora: Any = None, lm_head_positions: str = "all",
                    lm_head_chunk_tokens: int | None = None) -> MemoryEstimate:
    """Logits and activations of one micro-batch of ``micro_batch`` rows of ``max_seq_length`` tokens.

    Args:
        lora: the run's ``LoraConfig`` (``r``, ``target_modules``, ``dropout``), or None for full
            fine-tuning.
        lm_head_positions: ``model.lm_head_positions``. ``all``: logits for every token, ``dtype_bytes
            + 12`` bytes each. ``supervised``: logits for one chunk of at most ``lm_head_chunk_tokens``
            positions (None: ``training.lm_head.auto_chunk_tokens`` of the vocabulary), and never more
            than the micro-batch can supervise (``max_seq_length - 1`` per row), ``CHUNK_BYTES_PER_LOGIT``
            bytes each.

    Raises:
        InputError: ``lm_head_positions`` is neither ``all`` nor ``supervised``.

    >>> from types import SimpleNamespace
    >>> qwen = SimpleNamespace(vocab_size=151936, hidden_size=64, num_hidden_layers=1, num_attention_heads=4)
    >>> lora = SimpleNamespace(r=8, target_modules=["q_proj", "v_proj"], dropout=0.0)   # the head stays frozen
    >>> e = estimate_memory(qwen, micro_batch=1, max_seq_length=1024, dtype_bytes=4, attn_implementation="packed_sdpa",
    ...                     lora=lora, lm_head_positions="supervised")
    >>> e.positions, e.bytes_per_logit, e.logits_bytes    # 110 x 151,936 x 8 bytes: 0.12 GiB, not 2.32
    (110, 8, 133703680)
    """
    from packlora.core.errors import InputError

    tokens = micro_batch * max_seq_length
    vocab = model_config.vocab_size
    if lm_head_positions == "all":
        positions, per_logit = tokens, dtype_bytes + LOGITS_EXTRA_BYTES
    elif lm_head_positions == "supervised":
        from packlora.training.lm_head import auto_chunk_tokens

        chunk = lm_head_chunk_tokens or auto_chunk_tokens(vocab)
        positions = min(chunk, micro_batch * (max_seq_length - 1))
        per_logit = CHUNK_BYTES_PER_LOGIT[(4 if dtype_bytes >= 4 else 2, head_trains(lora))]
    else:
        raise InputError(f"model.lm_head_positions: {lm_head_positions!r} is not one of ['supervised', 'all']")
    act = activation_bytes(model_config, tokens, max_seq_length, dtype_bytes, attn_implementation,
                           None if lora is None else lora.r, () if lora is None else lora.target_modules,
                           0.0 if lora is None else lora.dropout)
    return MemoryEstimate(positions * vocab * per_logit, act, positions, tokens, vocab, dtype_bytes, per_logit,
                          lm_head_positions)
