"""``attn_implementation: varlen`` on CPU: the plumbing around torch's varlen kernel, with the kernel
replaced by a per-segment SDPA reference of the same signature (the real kernel is Flash Attention,
CUDA only; ``benchmarks/gpu_check.sh`` checks it on a GPU).

Batch: 2 rows with different segment counts, as in ``tests/data_utils/test_packed_attention.py``:
row 0 = [5, 7, 3] (exactly full, 15 tokens), row 1 = [4, 1, 6, 2] (a segment of length 1; padded
to 15 in the unflattened layout). Checked in fp32: logits within 1e-5 of each example run alone
with plain ``sdpa``, LoRA gradients within 1e-5 relative per tensor, and the exact ``cu_seq_lens``
and max lengths that reach the kernel in every layer.
"""
import inspect
import re

import pytest
import torch

from packlora.data_utils.collator import PackedCollator
from tiny_assets import PACKED_SEQ_LENS, PACKED_VOCAB, attention_model, packed_rows, summed_ce, trainable_grads
from packlora.training import varlen_attention
from packlora.training.isolation import PackedInputError, install_isolation_guard
from packlora.training.model import check_attention_backend

SEQ_LENS, VOCAB = PACKED_SEQ_LENS, PACKED_VOCAB


def _lora_model(attn, lora=True, **overrides):
    return attention_model(attn, lora, **overrides)
LAYERS = 2
# Segment boundaries, written out by hand from SEQ_LENS.
FLAT_CU = [0, 5, 12, 15, 19, 20, 26, 28]  # flattened: row 1 follows row 0, no padding
ROWS_CU = [0, 5, 12, 15, 19, 20, 26, 28, 30]  # unflattened [2, 15]: row 1's 2 padding tokens are a segment of their own
MAX_LEN = 7


def legacy_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """The torch 2.9/2.10 signature: causal as a flag, no GQA, no scale (1/sqrt(D) always)."""
    if key.shape[1] != query.shape[1]:
        raise RuntimeError(f"legacy kernel: {query.shape[1]} query heads but {key.shape[1]} key heads")
    return varlen_attention.reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                                                  window_size=(-1, 0) if is_causal else (-1, -1))


KERNELS = {"torch_2_13_signature": varlen_attention.reference_varlen_attn, "torch_2_10_signature": legacy_varlen_attn}


@pytest.fixture
def kernel_calls(monkeypatch, request):
    """Replace torch's kernel by the reference (``request.param`` picks the signature); record each call."""
    ref = KERNELS[getattr(request, "param", "torch_2_13_signature")]
    calls = []

    def recording(*args, **kwargs):
        calls.append({"cu_q": args[3].clone(), "cu_k": args[4].clone(), "max_q": args[5], "max_k": args[6],
                      "kv_heads": args[1].shape[1], "kwargs": dict(kwargs)})
        return ref(*args, **kwargs)

    recording.__signature__ = inspect.signature(ref)  # the plumbing reads the kernel's signature
    import torch.nn.attention.varlen as torch_varlen

    monkeypatch.setattr(torch_varlen, "varlen_attn", recording)
    return calls










def _alone(rows):
    """Logits of each example run alone through plain sdpa, and the LoRA gradients of their summed loss."""
    model = _lora_model("sdpa")
    logits = []
    for row in rows:
        start = 0
        for n in row["seq_lens"]:
            ids = torch.tensor([row["input_ids"][start : start + n]])
            out = model(input_ids=ids, use_cache=False).logits
            summed_ce(out, ids).backward()  # gradients accumulate over the examples
            logits.append(out[0].detach())
            start += n
    return logits, trainable_grads(model)


def _assert_equal_to_alone(packed_logits_per_segment, packed_grads, rows):
    alone_logits, alone_grads = _alone(rows)
    assert len(packed_logits_per_segment) == len(alone_logits) == 7
    worst = max((p - a).abs().max().item() for p, a in zip(packed_logits_per_segment, alone_logits))
    assert worst < 1e-5, f"max |packed - alone| logit = {worst}"
    assert packed_grads.keys() == alone_grads.keys() and len(packed_grads) == 2 * 5 * LAYERS  # A, B x 5 modules x 2 layers
    for name, g in alone_grads.items():
        rel = (packed_grads[name] - g).abs().max().item() / g.abs().max().item()
        assert rel < 1e-5, f"LoRA gradient {name} differs by {rel:.2e} (relative)"


@pytest.mark.parametrize("kernel_calls", list(KERNELS), indirect=True)
def test_flattened_batch_gives_the_kernel_the_segment_boundaries_and_equals_each_example_alone(kernel_calls):
    rows = packed_rows()
    batch = PackedCollator(pad_token_id=0, flash_attn_varlen=True)(rows)
    model = _lora_model("varlen")
    install_isolation_guard(model)
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False,
                cu_seq_lens_q=batch["cu_seq_lens_q"], cu_seq_lens_k=batch["cu_seq_lens_k"],
                max_length_q=batch["max_length_q"], max_length_k=batch["max_length_k"]).logits
    summed_ce(out, batch["labels"]).backward()  # first label of each segment is -100: no cross-segment target
    cuts = torch.tensor(FLAT_CU)
    per_segment = [out[0, s:e].detach() for s, e in zip(cuts[:-1].tolist(), cuts[1:].tolist())]
    _assert_equal_to_alone(per_segment, trainable_grads(model), rows)

    assert len(kernel_calls) == LAYERS  # one call per layer, the whole batch at once
    expected = torch.tensor(FLAT_CU, dtype=torch.int32)
    for call in kernel_calls:
        assert call["cu_q"].dtype == torch.int32 and torch.equal(call["cu_q"], expected), call["cu_q"]
        assert torch.equal(call["cu_k"], expected)
        assert (call["max_q"], call["max_k"]) == (MAX_LEN, MAX_LEN)


@pytest.mark.parametrize("kernel_calls", list(KERNELS), indirect=True)
def test_grouped_query_attention_and_causal_flag_reach_each_kernel_signature(kernel_calls):
    """4 query heads, 2 key/value heads: native GQA where the kernel has enable_gqa, repeated heads otherwise."""
    batch = PackedCollator(pad_token_id=0, flash_attn_varlen=True)(packed_rows())
    with torch.no_grad():
        _lora_model("varlen", lora=False)(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    call = kernel_calls[0]
    if "window_size" in call["kwargs"]:  # torch 2.13 signature
        assert call["kwargs"] == {"window_size": (-1, 0), "enable_gqa": True, "scale": 16 ** -0.5}
        assert call["kv_heads"] == 2
    else:  # torch 2.10 signature: no enable_gqa, no scale (the default 1/sqrt(16) is Qwen2's)
        assert call["kwargs"] == {"is_causal": True}
        assert call["kv_heads"] == 4


def test_unflattened_rows_take_their_boundaries_from_the_position_restarts(kernel_calls):
    rows = packed_rows()
    batch = PackedCollator(pad_token_id=0)(rows)  # [2, 15], no cu_seq_lens
    model = _lora_model("varlen")
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    summed_ce(out, batch["labels"]).backward()
    per_segment = [out[b, s : s + n].detach() for b, row in enumerate(rows)
                   for s, n in zip(torch.cumsum(torch.tensor([0, *row["seq_lens"][:-1]]), 0).tolist(), row["seq_lens"])]
    _assert_equal_to_alone(per_segment, trainable_grads(model), rows)
    assert all(torch.equal(c["cu_q"], torch.tensor(ROWS_CU, dtype=torch.int32)) for c in kernel_calls)
    assert all((c["max_q"], c["max_k"]) == (MAX_LEN, MAX_LEN) for c in kernel_calls)


def test_reference_has_the_installed_kernels_signature():
    """The stand-in must take exactly what torch's varlen_attn takes, or the plumbing test proves nothing."""
    from torch.nn.attention.varlen import varlen_attn

    assert inspect.signature(varlen_attention.reference_varlen_attn).parameters.keys() == \
        inspect.signature(varlen_attn).parameters.keys()


def test_left_padded_generation_runs_sdpa_and_never_the_kernel(monkeypatch):
    import torch.nn.attention.varlen as torch_varlen

    def forbidden(*args, **kwargs):
        raise AssertionError("generation with a padding mask and a KV cache must not reach the varlen kernel")

    monkeypatch.setattr(torch_varlen, "varlen_attn", forbidden)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    outs = [_lora_model(attn, lora=False).generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                              pad_token_id=0) for attn in ("sdpa", "varlen")]
    assert torch.equal(outs[0], outs[1])


def test_attention_dropout_in_training_is_refused(kernel_calls):
    model = _lora_model("varlen", lora=False, attention_dropout=0.1).train()
    batch = PackedCollator(pad_token_id=0, flash_attn_varlen=True)(packed_rows())
    with pytest.raises(ValueError, match="varlen: attention dropout 0.1 is not supported"):
        model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)


def test_cu_seq_lens_that_do_not_cover_the_row_are_refused(kernel_calls):
    model = _lora_model("varlen", lora=False)
    install_isolation_guard(model)
    batch = PackedCollator(pad_token_id=0, flash_attn_varlen=True)(packed_rows())
    batch.pop("labels")
    batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor([0, 5, 12], dtype=torch.int32)
    with pytest.raises(PackedInputError, match="cu_seq_lens_q ends at 12 but the batch is 1 row"):
        model(**batch, use_cache=False)
    assert kernel_calls == []


def test_refused_up_front_without_cuda_or_without_the_kernel(monkeypatch):
    with pytest.raises(ValueError, match=r"varlen runs Flash Attention, which needs a CUDA GPU.*use packed_sdpa"):
        check_attention_backend("varlen", cuda=False)
    check_attention_backend("varlen", cuda=True)  # this torch has the kernel

    def no_kernel():
        raise ImportError("cannot import name 'varlen' from 'torch.nn.attention'")

    monkeypatch.setattr(varlen_attention, "kernel", no_kernel)
    with pytest.raises(ValueError, match=r"varlen needs torch.nn.attention.varlen.varlen_attn \(torch >= 2.9\), "
                                         rf"and torch {re.escape(torch.__version__)} has none.*packed_sdpa"):
        check_attention_backend("varlen", cuda=True)


def test_config_refuses_varlen_in_float32_and_with_legacy_labels(run_config):
    from packlora.training.config import ConfigError, load_config

    path = run_config(**{"model.attn_implementation": "varlen", "model.dtype": "float32"})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == [
        "model.dtype: float32 with model.attn_implementation: varlen; Flash Attention takes bfloat16 or float16 "
        "only: set model.dtype: bfloat16 (or auto, bf16 on CUDA)",
    ]
    with pytest.raises(ConfigError) as err:  # a rule across sections, once each section is valid
        load_config(path, ["model.dtype=bfloat16", "data.labels=legacy_full_sequence"])
    assert err.value.problems == [
        "data.labels: legacy_full_sequence cannot run with model.attn_implementation: varlen, which isolates "
        "segments by construction; use sdpa or eager (set on the command line)",
    ]
    assert load_config(path, ["model.dtype=bfloat16"]).model.attn_implementation == "varlen"


def test_packlora_launch_refuses_varlen_on_cpu_before_starting_any_process(run_config, capsys, monkeypatch):
    from packlora.launcher import cli

    monkeypatch.setattr(cli, "_cuda_device_count", lambda: 0)
    monkeypatch.setattr(cli, "run_supervised", lambda *a, **k: pytest.fail("a process was started"))
    path = run_config(**{"model.attn_implementation": "varlen", "model.dtype": "bfloat16"})
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(path)])
    assert exit_.value.code == 2
    assert "varlen runs Flash Attention, which needs a CUDA GPU, and this machine has none; use packed_sdpa" \
        in capsys.readouterr().err


@pytest.mark.gpu
def test_real_kernel_on_cuda_packed_equals_each_example_alone_in_bf16():
    """The real Flash Attention kernel: the flattened batch vs each example alone through the same
    kernel, bf16 (the full bf16 tolerance study is benchmarks/gpu_check.sh)."""
    rows = packed_rows()
    model = _lora_model("varlen", lora=False).to("cuda", torch.bfloat16)
    batch = {k: v.cuda() if torch.is_tensor(v) else v
             for k, v in PackedCollator(pad_token_id=0, flash_attn_varlen=True)(rows).items()}
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0].float()
        worst = 0.0
        for s, e in zip(FLAT_CU[:-1], FLAT_CU[1:]):
            alone = model(input_ids=batch["input_ids"][:, s:e], use_cache=False).logits[0].float()
            worst = max(worst, (packed[s:e] - alone).abs().max().item())
    assert worst < 2e-2, worst
