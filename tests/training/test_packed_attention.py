"""A packed forward/backward pass equals each example run alone (fp32, CPU), on every backend.

Batch: 2 rows with different segment counts; row 0 is exactly full (15 tokens, no padding),
row 1 has a segment of length 1 and 2 padding tokens at the end. Isolation comes from
position_ids that restart per segment, with no attention_mask and no KV cache.
Checked: logits (1e-5 absolute) and LoRA gradients (1e-5 relative, per tensor).
"""
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from packlora.data_utils.collator import PackedCollator
from tiny_assets import (PACKED_SEQ_LENS, PACKED_VOCAB, attention_model, packed_rows, summed_ce, tiny_qwen2_config,
                         trainable_grads)
import packlora.training.packed_attention  # noqa: F401,E402  (registers packed_sdpa)
from packlora.training.isolation import PackedInputError, check_packed_inputs, has_restarts, install_isolation_guard

SEQ_LENS, VOCAB = PACKED_SEQ_LENS, PACKED_VOCAB  # row 0 is 15 tokens (full), row 1 is 13 -> padded with 2










def _check_packed_equals_alone(attn, grads=True, device="cpu"):
    model, rows = attention_model(attn, lora=True).to(device), packed_rows()
    batch = PackedCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].shape == (2, 15)
    with torch.set_grad_enabled(grads):
        packed = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                       use_cache=False).logits
        if grads:
            summed_ce(packed, batch["labels"].to(device)).backward()
            g_packed = trainable_grads(model)
            model.zero_grad()
        worst_logit = 0.0
        for b, row in enumerate(rows):
            start = 0
            for n in row["seq_lens"]:
                ids = torch.tensor([row["input_ids"][start : start + n]], device=device)
                alone = model(input_ids=ids, use_cache=False).logits
                worst_logit = max(worst_logit, (packed[b, start : start + n] - alone[0]).abs().max().item())
                if grads:
                    summed_ce(alone, ids).backward()  # gradients accumulate over the examples
                start += n
    assert worst_logit < 1e-5, f"{attn}: max |packed - alone| logit = {worst_logit}"
    if not grads:
        return
    g_alone = trainable_grads(model)
    assert g_packed.keys() == g_alone.keys() and len(g_packed) == 2 * 5 * 2  # A and B, 5 modules, 2 layers
    for name, g in g_alone.items():
        rel = (g_packed[name] - g).abs().max().item() / g.abs().max().item()
        assert rel < 1e-5, f"{attn}: LoRA gradient {name} differs by {rel:.2e} (relative)"


@pytest.mark.parametrize("attn", ["sdpa", "eager", "packed_sdpa"])
def test_packed_logits_and_lora_gradients_equal_each_example_alone(attn):
    _check_packed_equals_alone(attn)


def test_flex_attention_packed_forward_equals_alone_on_cpu():
    """flex_attention builds a block mask from the restarting positions (compiles: about 30 s on 2
    cores). torch 2.13 has no flex backward on CPU, so gradients are checked on GPU only and
    training with flex on CPU is refused up front (test_config)."""
    _check_packed_equals_alone("flex_attention", grads=False)


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "packed_sdpa", "eager", "flex_attention"])
def test_packed_logits_and_lora_gradients_equal_alone_on_gpu_fp32(attn):
    _check_packed_equals_alone(attn, device="cuda")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_without_position_resets_segments_do_leak(attn):
    """Control: the same batch with plain 0..L-1 positions is contaminated, so the test above can fail."""
    model, rows = attention_model(attn), packed_rows()
    batch = PackedCollator(pad_token_id=0)(rows)
    plain = torch.arange(15).expand(2, 15)
    with torch.no_grad():
        leaked = model(input_ids=batch["input_ids"], position_ids=plain, use_cache=False).logits
        second = rows[0]["input_ids"][5:12]
        alone = model(input_ids=torch.tensor([second]), use_cache=False).logits
    assert (leaked[0, 5:12] - alone[0]).abs().max().item() > 1e-3


def test_guard_refuses_an_attention_mask_with_a_packed_batch():
    model = attention_model("sdpa")
    install_isolation_guard(model)
    batch = PackedCollator(pad_token_id=0)(packed_rows())
    mask = torch.ones_like(batch["input_ids"])
    with pytest.raises(PackedInputError, match="given an attention_mask"):
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=mask, use_cache=False)
    with pytest.raises(PackedInputError, match="use_cache=True"):
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True)
    # the isolated combination passes
    model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)


@pytest.mark.parametrize("attn", ["sdpa", "packed_sdpa"])
def test_guard_lets_left_padded_generation_through(attn):
    model = attention_model(attn)
    install_isolation_guard(model)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 8)


def test_flash_attention_needs_the_flattened_layout():
    pos = torch.tensor([[0, 1, 0, 1], [0, 1, 2, 0]])
    with pytest.raises(PackedInputError, match="flash-attention packed batch has 2 rows and no cu_seq_lens_q"):
        check_packed_inputs({"position_ids": pos}, "flash_attention_2")
    check_packed_inputs({"position_ids": pos[:1], "cu_seq_lens_q": torch.tensor([0, 2, 4])}, "flash_attention_2")
    assert has_restarts(pos) and not has_restarts(torch.tensor([[0, 1, 2, 3]]))


@pytest.mark.gpu
def test_flash_attention_varlen_packed_equals_alone_on_gpu():
    pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    cfg = tiny_qwen2_config(vocab_size=VOCAB)
    cfg.pop("model_type")
    model = AutoModelForCausalLM.from_config(
        Qwen2Config(**cfg), attn_implementation="flash_attention_2", dtype=torch.bfloat16
    ).cuda().eval()
    rows = packed_rows()
    batch = PackedCollator(pad_token_id=0, flash_attn_varlen=True)(rows)
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}
    batch.pop("labels")
    with torch.no_grad():
        packed = model(**batch, use_cache=False).logits[0]
        start, worst = 0, 0.0
        for row in rows:
            for n in row["seq_lens"]:
                seg = batch["input_ids"][0, start : start + n][None]
                alone = model(input_ids=seg, use_cache=False).logits[0]
                worst = max(worst, (packed[start : start + n] - alone).abs().max().item())
                start += n
    assert worst < 2e-2  # bf16


def test_packed_sdpa_generation_with_left_padding_matches_sdpa():
    """With a padding mask and a KV cache, packed_sdpa is plain sdpa: identical greedy tokens."""
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    outs = [attention_model(attn).generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
            for attn in ("sdpa", "packed_sdpa")]
    assert torch.equal(outs[0], outs[1])
