"""A packed forward pass equals each example run alone (fp32, CPU), for sdpa and eager.

Batch: 2 rows, 3+ segments each, one segment of length 1, padding at the end of a row.
Isolation comes from position_ids that restart per segment, with no attention_mask and no cache.
"""
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from data_utils.collator import PackedCollator
from tiny_assets import tiny_qwen2_config

SEQ_LENS = [[5, 7, 3], [4, 1, 6, 2]]  # row 0 is 15 tokens, row 1 is 13 -> padded with 2


def _model(attn):
    torch.manual_seed(0)
    cfg = tiny_qwen2_config(vocab_size=97)
    cfg.pop("model_type")
    return AutoModelForCausalLM.from_config(Qwen2Config(**cfg), attn_implementation=attn, dtype=torch.float32).eval()


def _rows():
    g = torch.Generator().manual_seed(1)
    rows = []
    for lens in SEQ_LENS:
        ids = torch.randint(3, 97, (sum(lens),), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids, "seq_lens": lens})
    return rows


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_each_example_alone(attn):
    model, rows = _model(attn), _rows()
    batch = PackedCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].shape == (2, 15)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        worst = 0.0
        for b, row in enumerate(rows):
            start = 0
            for n in row["seq_lens"]:
                alone = model(input_ids=torch.tensor([row["input_ids"][start : start + n]]), use_cache=False).logits
                worst = max(worst, (packed[b, start : start + n] - alone[0]).abs().max().item())
                start += n
    assert worst < 1e-5, f"{attn}: max |packed - alone| = {worst}"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_without_position_resets_segments_do_leak(attn):
    """Control: the same batch with plain 0..L-1 positions is contaminated, so the test above can fail."""
    model, rows = _model(attn), _rows()
    batch = PackedCollator(pad_token_id=0)(rows)
    plain = torch.arange(15).expand(2, 15)
    with torch.no_grad():
        leaked = model(input_ids=batch["input_ids"], position_ids=plain, use_cache=False).logits
        second = rows[0]["input_ids"][5:12]
        alone = model(input_ids=torch.tensor([second]), use_cache=False).logits
    assert (leaked[0, 5:12] - alone[0]).abs().max().item() > 1e-3


@pytest.mark.gpu
def test_flash_attention_varlen_packed_equals_alone_on_gpu():
    pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    cfg = tiny_qwen2_config(vocab_size=97)
    cfg.pop("model_type")
    model = AutoModelForCausalLM.from_config(
        Qwen2Config(**cfg), attn_implementation="flash_attention_2", dtype=torch.bfloat16
    ).cuda().eval()
    rows = _rows()
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
