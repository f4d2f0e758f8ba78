"""The activation estimate of ``training/memory.py`` against what autograd really keeps: every tensor
saved for the backward pass of a tiny Qwen2 (``torch.autograd.graph.saved_tensors_hooks``), weights
excluded, on packed rows whose positions restart, for shapes and adapter sets other than the one
the formula was counted on. The logits formula is a measurement of peak memory (its docstring)."""
from __future__ import annotations

import pytest
import torch

from packlora.training.memory import activation_bytes, estimate_memory, logits_bytes

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _saved_bytes_per_layer(config: dict, attn: str, targets, r: int, dropout: float, row: int) -> float:
    """Bytes autograd keeps per decoder layer for one packed row of ``row`` tokens (two segments):
    the difference between a 3- and a 1-layer model, so the embedding and the head drop out."""
    import packlora.training.model  # noqa: F401  (registers packed_sdpa)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    def saved(layers: int) -> int:
        torch.manual_seed(0)
        cfg = AutoConfig.for_model("qwen2", num_hidden_layers=layers, **config)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
        model.config.use_cache = False
        if targets is not None:
            model = get_peft_model(model, LoraConfig(r=r, target_modules=list(targets), lora_dropout=dropout))
        model.train()
        weights = {p.data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(t):
            if t.data_ptr() not in weights and t.numel():
                s = t.untyped_storage()
                storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())
            return t

        ids = torch.randint(0, config["vocab_size"], (1, row))
        positions = torch.cat([torch.arange(row // 3), torch.arange(row - row // 3)])[None]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, position_ids=positions, labels=ids)
        return sum(storages.values())

    return (saved(3) - saved(1)) / 2


SHAPE = dict(hidden_size=96, intermediate_size=320, num_attention_heads=6, num_key_value_heads=2, vocab_size=300)


@pytest.mark.parametrize(
    ("attn", "targets", "dropout"),
    [
        ("packed_sdpa", ALL, 0.0),
        ("sdpa", ["q_proj", "k_proj", "v_proj", "o_proj"], 0.0),
        ("eager", ["o_proj", "down_proj"], 0.0),
        ("packed_sdpa", ["q_proj", "v_proj", "down_proj"], 0.05),
        ("packed_sdpa", None, 0.0),  # lora: null
    ],
)
def test_activation_estimate_matches_what_autograd_saves_within_5_percent(attn, targets, dropout):
    from transformers import AutoConfig

    row, r = 96, 8
    measured = _saved_bytes_per_layer(SHAPE, attn, targets, r, dropout, row)
    config = AutoConfig.for_model("qwen2", num_hidden_layers=1, **SHAPE)
    estimated = activation_bytes(config, row, row, 4, attn, None if targets is None else r, targets or (), dropout)

    assert estimated == pytest.approx(measured, rel=0.05), (estimated, measured)


def test_full_logits_are_counted_for_every_token_of_the_micro_batch():
    from types import SimpleNamespace

    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen2", num_hidden_layers=2, **SHAPE)
    lora = SimpleNamespace(r=8, target_modules=["q_proj"], dropout=0.0)
    full = estimate_memory(config, micro_batch=2, max_seq_length=512, dtype_bytes=2, attn_implementation="sdpa",
                           lora=lora, lm_head_positions="all")

    assert full.logits_bytes == 2 * 512 * 300 * 14 == logits_bytes(1024, 300, 2)  # bf16: 2 + 12 bytes each
    assert full.positions == 1024 and full.bytes_per_logit == 14
    assert "logits 0.00 GiB (every position: 1024 positions x 300 ids x 14 bytes)" in full.describe()


QWEN2 = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
             vocab_size=151936, num_hidden_layers=24)  # Qwen2.5-0.5B's shape


@pytest.mark.parametrize(("dtype_bytes", "targets", "chunk", "positions", "per_logit"), [
    (4, ["q_proj", "v_proj"], None, 110, 8),            # auto chunk: 64 MiB // (4 x 151,936) = 110; frozen head, fp32
    (2, ["q_proj", "v_proj"], None, 110, 13),           # frozen head, bf16
    (2, ["q_proj", "lm_head"], 512, 512, 14),           # a LoRA on lm_head trains the head
    (4, None, 512, 512, 10),                            # lora: null, every parameter trains
    (4, ["q_proj"], 100_000, 2 * (4096 - 1), 8),        # a chunk larger than the micro-batch can supervise
])
def test_supervised_head_logits_are_one_chunk_whatever_the_rows(dtype_bytes, targets, chunk, positions, per_logit):
    from types import SimpleNamespace

    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen2", **QWEN2)
    lora = None if targets is None else SimpleNamespace(r=8, target_modules=targets, dropout=0.0)
    kw = dict(max_seq_length=4096, dtype_bytes=dtype_bytes, attn_implementation="packed_sdpa", lora=lora,
              lm_head_positions="supervised", lm_head_chunk_tokens=chunk)
    one, two = (estimate_memory(config, micro_batch=m, **kw) for m in (1, 2))
    full = estimate_memory(config, micro_batch=2, **{**kw, "lm_head_positions": "all"})

    assert two.positions == positions and two.bytes_per_logit == per_logit
    assert two.logits_bytes == positions * 151936 * per_logit
    if positions < 4095:  # one chunk: a second row adds activations, not logits
        assert one.logits_bytes == two.logits_bytes and two.activation_bytes == 2 * one.activation_bytes
    assert two.activation_bytes == full.activation_bytes and full.logits_bytes == 2 * 4096 * 151936 * (dtype_bytes + 12)
    assert (f"(model.lm_head_positions: supervised, one chunk at a time: {positions} positions x 151936 ids x "
            f"{per_logit} bytes)") in two.describe()


@pytest.mark.parametrize(("positions", "line"), [
    # 110 (= 64 MiB // (4 x 151,936)) positions x 151,936 ids x 8 bytes (fp32, frozen tied head) = 0.12 GiB
    ("supervised", "logits 0.12 GiB (model.lm_head_positions: supervised, one chunk at a time: 110 positions x "
                   "151936 ids x 8 bytes)"),
    # 1 row x 1,024 tokens x 151,936 ids x (4 + 12) bytes = 2.32 GiB
    ("all", "logits 2.32 GiB (every position: 1024 positions x 151936 ids x 16 bytes)"),
])
def test_the_start_up_estimate_of_the_bundled_run_follows_lm_head_positions(positions, line):
    """What rank 0 logs for configs/shishuo_tiny.yaml (fp32 on CPU, one 1,024-token row, LoRA on the
    layers only, so the tied head is frozen), its model shape over Qwen2.5's 151,936-id embedding."""
    from pathlib import Path

    from transformers import AutoConfig

    from packlora.training.config import load_config
    from packlora.training.recipe import run_memory_estimate

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(repo / "configs" / "shishuo_tiny.yaml", [f"model.lm_head_positions={positions}", "model.dtype=float32"])
    config = AutoConfig.for_model(**{**cfg.model.config, "vocab_size": 151936})
    assert line in run_memory_estimate(cfg, config, micro_batch=1).describe()


def test_an_unknown_head_setting_is_refused_naming_the_key():
    from types import SimpleNamespace

    from packlora.core.errors import InputError

    with pytest.raises(InputError, match="model.lm_head_positions: 'some' is not one of"):
        estimate_memory(SimpleNamespace(vocab_size=10), micro_batch=1, max_seq_length=8, dtype_bytes=4,
                        attn_implementation="sdpa", lm_head_positions="some")
