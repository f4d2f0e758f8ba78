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


def test_logits_are_counted_per_projected_position_and_the_default_projects_every_token():
    from types import SimpleNamespace

    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen2", num_hidden_layers=2, **SHAPE)
    lora = SimpleNamespace(r=8, target_modules=["q_proj"], dropout=0.0)
    full = estimate_memory(config, micro_batch=2, max_seq_length=512, dtype_bytes=2, attn_implementation="sdpa", lora=lora)
    supervised = estimate_memory(config, micro_batch=2, max_seq_length=512, dtype_bytes=2, attn_implementation="sdpa",
                                 lora=lora, positions=100)

    assert full.logits_bytes == 2 * 512 * 300 * 14 == logits_bytes(1024, 300, 2)  # bf16: 2 + 12 bytes each
    assert supervised.logits_bytes == 100 * 300 * 14 and supervised.activation_bytes == full.activation_bytes
    assert "logits 0.00 GiB (1024 positions x 300 ids x 14 bytes)" in full.describe()
