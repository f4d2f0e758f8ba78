"""Loss normalisation over the whole optimizer step: the same gradient however the step's examples
are laid out.

Eight text examples of 44..58 tokens pack into exactly 4 rows of 2 (max_seq_length 120: any two fit,
no three do). One SGD step with lr 1 and no clipping/decay makes ``B_after = B_init - grad_B`` and
LoRA B starts at zero, so the saved ``lora_B`` tensors *are* minus the gradient. For each loss
normalisation, these layouts must give the same gradient (relative 1e-5, fp32, gloo):

    1 row  x accumulation 4   (1 process)
    4 rows x accumulation 1   (1 process)
    2 ranks x 2 rows          (2 processes)
    8 unpacked rows, padded   (1 process, data.packing=false)

Every layout runs with the default ``model.lm_head_positions: supervised`` (the head and the loss at
the trained positions only). ``2 ranks x 2 rows`` also runs with ``all`` (today's full logits): the
same gradient (relative 1e-5) under ZeRO-2 with 2 processes, for both normalisations.
"""
from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from launching import launch
from tiny_assets import build_chatml_tokenizer, tiny_qwen2_config

pytestmark = pytest.mark.distributed

TARGET_LENGTHS = [44, 46, 48, 50, 52, 54, 56, 58]  # tokens incl. EOS; any 2 <= 120 < any 3
LAYOUTS = {  # name: (processes, rows per micro-batch, accumulation, packing, model.lm_head_positions)
    "1row_x_accum4": (1, 1, 4, True, "supervised"),
    "4rows_x_accum1": (1, 4, 1, True, "supervised"),
    "2ranks_x_2rows": (2, 2, 1, True, "supervised"),
    "unpacked_padded": (1, 8, 1, False, "supervised"),
    "2ranks_x_2rows_full_logits": (2, 2, 1, True, "all"),
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("loss_invariance")
    tok = build_chatml_tokenizer(ws / "tokenizer")
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "once", "upon", "time", "scholar"]
    rng = random.Random(0)
    texts = []
    for target in TARGET_LENGTHS:  # grow a text word by word until it has exactly target-1 tokens (+ EOS)
        text = ""
        while True:
            cand = (text + " " + rng.choice(words)).strip()
            n = len(tok(cand, add_special_tokens=False)["input_ids"])
            if n > target - 1:
                continue
            text = cand
            if n == target - 1:
                break
        texts.append(text)
    (ws / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    config = {
        "output_dir": str(ws / "unused"),
        "seed": 0,
        "deepspeed": "zero2.json",
        "model": {"config": tiny_qwen2_config(len(tok)), "tokenizer": str(ws / "tokenizer")},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": [str(ws / "texts.jsonl")], "max_seq_length": 120, "cache_dir": str(ws / "cache")},
        "training": {"max_steps": 1, "optim": "sgd", "learning_rate": 1.0, "lr_scheduler_type": "constant",
                     "max_grad_norm": 0.0, "weight_decay": 0.0, "save_strategy": "no", "report_to": []},
        "decoding": {"max_new_tokens": 4},
    }
    (ws / "run.yaml").write_text(yaml.safe_dump(config))
    return ws


def _run(ws, normalization: str, layout: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    procs, micro, accum, packing, positions = LAYOUTS[layout]
    out = ws / f"{normalization}-{layout}"
    launch(ws / "run.yaml", "--nproc-per-node", str(procs), f"output_dir={out}", f"loss_normalization={normalization}",
           f"training.per_device_train_batch_size={micro}", f"training.gradient_accumulation_steps={accum}",
           f"data.packing={str(packing).lower()}", f"model.lm_head_positions={positions}",
           log=ws / f"{normalization}-{layout}.log")
    report = json.loads((out / "data_report.json").read_text())
    assert report["rows"] == (4 if packing else 8) and report["examples"] == 8
    return {k: v for k, v in load_file(str(out / "adapter_model.safetensors")).items() if "lora_B" in k}


@pytest.fixture(scope="module")
def gradients(workspace):
    cache = {}

    def get(normalization, layout):
        if (normalization, layout) not in cache:
            cache[normalization, layout] = _run(workspace, normalization, layout)
        return cache[normalization, layout]

    return get


def _max_rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) == 4  # q_proj and v_proj lora_B, 2 layers
    return max((a[k] - b[k]).abs().max().item() / b[k].abs().max().item() for k in a)


@pytest.mark.parametrize("normalization", ["per_token", "per_example"])
@pytest.mark.parametrize("layout", ["4rows_x_accum1", "2ranks_x_2rows", "unpacked_padded"])
def test_gradient_is_the_same_for_every_layout_of_the_step(gradients, normalization, layout):
    reference = gradients(normalization, "1row_x_accum4")
    assert all(t.abs().max().item() > 1e-4 for t in reference.values())  # a real gradient was applied
    assert _max_rel_diff(gradients(normalization, layout), reference) < 1e-5


@pytest.mark.parametrize("normalization", ["per_token", "per_example"])
def test_supervised_head_gives_the_full_logits_gradient_under_zero2_with_2_ranks(gradients, normalization):
    full = gradients(normalization, "2ranks_x_2rows_full_logits")
    assert all(t.abs().max().item() > 1e-4 for t in full.values())
    assert _max_rel_diff(gradients(normalization, "2ranks_x_2rows"), full) < 1e-5


def test_per_example_weighting_differs_from_per_token(gradients):
    """The examples have different lengths, so weighting them equally must change the gradient."""
    assert _max_rel_diff(gradients("per_example", "4rows_x_accum1"), gradients("per_token", "4rows_x_accum1")) > 1e-3
