"""The supervised-only, chunked LM head under DeepSpeed ZeRO-3 with 2 processes gives today's
training and evaluation losses and LoRA updates (``model.lm_head_positions: supervised`` vs ``all``).

Two pairs of tiny runs on 20 real chats (``../shared``), 2 ranks x 2 rows per micro-batch, 2 SGD
steps, ZeRO-3 with ``stage3_param_persistence_threshold: 0`` (every tensor, the head included, is
partitioned), tied input/output embeddings:

    frozen_head   per_token,   LoRA on q_proj, v_proj            (the default setting: the head is frozen)
    lora_on_head  per_example, LoRA on q_proj, v_proj and lm_head (the head trains, through PEFT's
                                                                   LoRA layer, a DeepSpeed leaf module)

The head chunk is 16 positions, so every row takes several chunks, a different number on each
rank and each step (``training.lm_head.prepare_head_for_zero3`` keeps the ranks' gathers in step
when the head has submodules). Checked per pair: the losses of both steps (relative 1e-6), the
evaluation loss before training (``eval_on_start``, identical weights; 1e-6) and after it (1e-5),
and every saved LoRA tensor (relative 1e-5 of its largest entry). ZeRO-2 with 2 processes is
checked against full logits in ``test_loss_invariance.py``.
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
RUNS = {  # name: (loss_normalization, LoRA target modules)
    "frozen_head": ("per_token", "[q_proj,v_proj]"),
    "lora_on_head": ("per_example", "[q_proj,v_proj,lm_head]"),
}
LORA_B_TENSORS = {"frozen_head": 4, "lora_on_head": 5}  # q and v of 2 layers (+ the head's)


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
        "deepspeed": str(ws / "zero3_partition_all.json"),
        "model": {"config": tiny_qwen2_config(400, initializer_range=0.2), "tokenizer": str(ws / "tokenizer"),
                  "attn_implementation": "sdpa", "lm_head_chunk_tokens": 16},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": [str(ws / "chats.jsonl")], "eval_split": 4, "max_seq_length": 512, "overflow": "drop",
                 "cache_dir": str(ws / "cache")},
        "training": {"max_steps": 2, "optim": "sgd", "learning_rate": 0.5, "lr_scheduler_type": "constant",
                     "max_grad_norm": 0.0, "weight_decay": 0.0, "per_device_train_batch_size": 2,
                     "per_device_eval_batch_size": 2, "eval_strategy": "steps", "eval_steps": 2,
                     "eval_on_start": True, "save_steps": 2, "report_to": []},
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
            normalization, targets = RUNS[name]
            out = workspace / f"{name}-{positions}"
            overrides = [f"output_dir={out}", f"loss_normalization={normalization}", f"lora.target_modules={targets}",
                         f"model.lm_head_positions={positions}"]
            if positions == "all":
                overrides.append("model.lm_head_chunk_tokens=null")
            launch(workspace / "run.yaml", "--nproc-per-node", "2", *overrides, log=out.with_suffix(".log"))
            history = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
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
    assert len(train) == len(ref_train) == 2 and len(evals) == len(ref_evals) == 2
    assert all(x > 1.0 for x in ref_train + ref_evals)  # a real cross-entropy over 400 ids, not a zero
    assert train == pytest.approx(ref_train, rel=1e-6)
    assert evals[0] == pytest.approx(ref_evals[0], rel=1e-6)  # before training: identical weights
    assert evals[1] == pytest.approx(ref_evals[1], rel=1e-5)  # after 2 steps of equal (1e-5) updates
    lora = sorted(k for k in ref_adapter if "lora_B" in k)
    assert len(lora) == LORA_B_TENSORS[name] and any("lm_head" in k for k in lora) == (name == "lora_on_head")
    assert adapter.keys() == ref_adapter.keys()
    for k in lora:
        ref = ref_adapter[k]
        assert ref.abs().max() > 1e-4, k  # the step really moved this tensor
        assert torch.allclose(adapter[k], ref, rtol=0, atol=1e-5 * ref.abs().max().item()), k
