"""The supervised-only, chunked LM head under DeepSpeed with 2 processes gives today's training and
evaluation losses and LoRA updates (``model.lm_head_positions: supervised`` vs ``all``).

Four tiny runs on 16 real chats (``../shared``), 2 ranks x 2 rows per micro-batch, 3 SGD steps:

    zero3 (stage3_param_persistence_threshold 0: every tensor, the tiny head included, partitioned),
          per_token, tied input/output embeddings, LoRA on q_proj, v_proj and lm_head:  supervised vs all
    zero2, per_example, untied head, LoRA on q_proj and v_proj:                         supervised vs all

Under ZeRO-3 the chunked head runs through PEFT's LoRA layer and ZeRO-3's gather hooks on a
weight the embedding shares. The head chunk is 16 positions, so every row takes several chunks, a
different number on each rank and each step (``training.lm_head.prepare_head_for_zero3`` is what
keeps the ranks' gathers in step). Checked per pair: the
losses of all 3 steps (relative 1e-6), the evaluation loss before training (``eval_on_start``,
identical weights; relative 1e-6) and after it, and every saved LoRA tensor after the 3 steps
(relative 1e-5 of its largest entry).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from launching import launch
from tiny_assets import SHISHUO_CHATS, build_chatml_tokenizer, tiny_qwen2_config

pytestmark = pytest.mark.distributed

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNS = {  # name: (deepspeed config, loss_normalization, further overrides)
    "zero3": ("zero3_partition_all.json", "per_token", []),
    # A LoRA on lm_head cannot be saved under ZeRO-2 (PEFT then also saves lm_head.base_layer.weight,
    # which packlora's adapter check refuses, with either lm_head_positions), so this run has the
    # untied head without one.
    "zero2": ("zero2.json", "per_example", ["model.config.tie_word_embeddings=false",
                                            "lora.target_modules=[q_proj,v_proj]"]),
}
LORA_B_TENSORS = {"zero3": 5, "zero2": 4}  # q and v of 2 layers (+ the head's)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.mktemp("lm_head_zero")
    build_chatml_tokenizer(ws / "tokenizer")
    lines = SHISHUO_CHATS.read_text(encoding="utf-8").splitlines()[:20]
    (ws / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = json.loads((REPO_ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (ws / "zero3_partition_all.json").write_text(json.dumps(ds, indent=1))
    config = {
        "output_dir": str(ws / "unused"),
        "seed": 0,
        "model": {"config": tiny_qwen2_config(400, initializer_range=0.2), "tokenizer": str(ws / "tokenizer"),
                  "attn_implementation": "sdpa", "lm_head_chunk_tokens": 16},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "lm_head"]},
        "data": {"train": [str(ws / "chats.jsonl")], "eval_split": 4, "max_seq_length": 512, "overflow": "drop",
                 "cache_dir": str(ws / "cache")},
        "training": {"max_steps": 3, "optim": "sgd", "learning_rate": 0.5, "lr_scheduler_type": "constant",
                     "max_grad_norm": 0.0, "weight_decay": 0.0, "per_device_train_batch_size": 2,
                     "per_device_eval_batch_size": 2, "eval_strategy": "steps", "eval_steps": 3,
                     "eval_on_start": True, "save_steps": 3, "report_to": []},
        "decoding": {"max_new_tokens": 4},
    }
    (ws / "run.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return ws


@pytest.fixture(scope="module")
def runs(workspace):
    """``runs(name, positions)`` -> ``(log_history, {lora tensor name: tensor})``, launched once each."""
    from safetensors.torch import load_file

    cache = {}

    def get(name: str, positions: str):
        if (name, positions) not in cache:
            ds, normalization, more = RUNS[name]
            ds = str(workspace / ds) if ds.startswith("zero3") else ds
            out = workspace / f"{name}-{positions}"
            overrides = [f"output_dir={out}", f"deepspeed={ds}", f"loss_normalization={normalization}",
                         f"model.lm_head_positions={positions}", *more]
            if positions == "all":
                overrides.append("model.lm_head_chunk_tokens=null")
            launch(workspace / "run.yaml", "--nproc-per-node", "2", *overrides, log=out.with_suffix(".log"))
            history = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"]
            cache[name, positions] = history, load_file(str(out / "adapter_model.safetensors"))
        return cache[name, positions]

    return get


def _losses(history) -> tuple[list[float], list[float]]:
    train = [h["loss"] for h in history if "loss" in h]
    evals = [h["eval_loss"] for h in history if "eval_loss" in h]
    return train, evals


@pytest.mark.parametrize("name", list(RUNS))
def test_supervised_head_trains_and_evaluates_like_full_logits(runs, name):
    history, adapter = runs(name, "supervised")
    ref_history, ref_adapter = runs(name, "all")
    train, evals = _losses(history)
    ref_train, ref_evals = _losses(ref_history)
    assert len(train) == len(ref_train) == 3 and len(evals) == len(ref_evals) == 2
    assert all(x > 1.0 for x in ref_train + ref_evals)  # a real cross-entropy over 400 ids, not a zero
    assert train == pytest.approx(ref_train, rel=1e-6)
    assert evals[0] == pytest.approx(ref_evals[0], rel=1e-6)  # before training: identical weights
    assert evals[1] == pytest.approx(ref_evals[1], rel=1e-5)  # after 3 steps of equal (1e-5) updates
    lora = sorted(k for k in ref_adapter if "lora_B" in k)
    assert len(lora) == LORA_B_TENSORS[name] and any("lm_head" in k for k in lora) == (name == "zero3")
    assert adapter.keys() == ref_adapter.keys()
    for k in lora:
        ref = ref_adapter[k]
        assert ref.abs().max() > 1e-4, k  # the step really moved this tensor
        assert torch.allclose(adapter[k], ref, rtol=0, atol=1e-5 * ref.abs().max().item()), k
