"""bf16 end to end on CPU: 2-process DeepSpeed ZeRO-2 and ZeRO-3 runs with ``model.dtype: bfloat16``.

What users run on GPUs, here on CPU so that CI covers it: a bf16 base (saved in bf16, as Qwen
checkpoints are), DeepSpeed's ``bf16`` section and its bf16 ZeRO optimizer, saving, reloading the
adapter on the bf16 base, decoding in bf16, and ``packlora export --merge`` to a bf16 model.
One tiny run per stage (4 steps, ~30 s each on 2 cores).

    python -m pytest -m distributed tests/distributed/test_bf16_cpu.py -q
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from launching import REPO_ROOT, launch
from tiny_assets import SHISHUO_CHATS, build_chatml_tokenizer, tiny_qwen2_config

pytestmark = pytest.mark.distributed

VOCAB, RECORDS, HOLDOUT, STEPS = 400, 48, 2, 4
RANK = 8
# adapter_model.safetensors holds q_proj and v_proj A (r, in) and B (out, r) for 2 layers at full
# shape; q_proj out = 4 heads x 16 = 64, v_proj out = 2 kv heads x 16 = 32.
EXPECTED_SHAPES = {
    f"base_model.model.model.layers.{i}.self_attn.{proj}.lora_{ab}.weight": shape
    for i in range(2)
    for proj, ab, shape in (("q_proj", "A", (8, 64)), ("q_proj", "B", (64, 8)),
                            ("v_proj", "A", (8, 64)), ("v_proj", "B", (32, 8)))
}
# Measured with deepspeed 0.19.8 + peft 0.21.2: ZeRO-2's engine casts the whole module, adapters
# included, to bf16; under ZeRO-3 only the base is bf16 and PEFT keeps the adapters in fp32.
ADAPTER_DTYPE = {"zero2": torch.bfloat16, "zero3": torch.float32}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """Tokenizer, 48 real chats, a tiny Qwen2 base saved in bf16, ZeRO-3 JSON partitioning every tensor."""
    from transformers import AutoConfig, AutoModelForCausalLM

    ws = tmp_path_factory.mktemp("bf16_cpu")
    tok = build_chatml_tokenizer(ws / "base", vocab_size=VOCAB)
    torch.manual_seed(0)
    spec = tiny_qwen2_config(VOCAB, initializer_range=0.2)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**spec), dtype=torch.bfloat16)
    base.save_pretrained(ws / "base")
    tok.save_pretrained(ws / "base")
    lines = SHISHUO_CHATS.read_text(encoding="utf-8").splitlines()[:RECORDS]
    (ws / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    ds = json.loads((REPO_ROOT / "ds_configs" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (ws / "zero3.json").write_text(json.dumps(ds))
    (ws / "run.yaml").write_text(yaml.safe_dump({
        "output_dir": str(ws / "unused"),
        "seed": 0,
        "log_batch_digests": True,
        "model": {"name_or_path": str(ws / "base"), "attn_implementation": "packed_sdpa", "dtype": "bfloat16"},
        "lora": {"r": RANK, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": [str(ws / "chats.jsonl")], "max_seq_length": 512, "overflow": "drop",
                 "eval_holdout": HOLDOUT, "cache_dir": str(ws / "cache")},
        "training": {"max_steps": STEPS, "save_steps": 2, "learning_rate": 2.0e-2, "lr_scheduler_type": "constant",
                     "per_device_train_batch_size": 1, "logging_steps": 1},
        "decoding": {"max_new_tokens": 8},
    }, allow_unicode=True), encoding="utf-8")
    return ws


@pytest.fixture(scope="module")
def trained(workspace):
    runs: dict[str, Path] = {}

    def get(stage: str) -> Path:
        if stage not in runs:
            out = workspace / stage
            ds = str(workspace / "zero3.json") if stage == "zero3" else "zero2.json"
            launch(workspace / "run.yaml", "--nproc-per-node", "2", f"output_dir={out}", f"deepspeed={ds}",
                   log=workspace / f"{stage}.log", timeout=400)
            runs[stage] = out
        return runs[stage]

    return get


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_trains_in_bf16_with_both_ranks(trained, stage):
    out = trained(stage)
    shards = sorted(p.name for p in (out / f"checkpoint-{STEPS}" / f"global_step{STEPS}").glob("bf16_zero_*"))
    assert shards == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    digests = {r: [json.loads(line) for line in (out / f"batches.rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    assert all(d["world_size"] == 2 for r in (0, 1) for d in digests[r])
    assert not {d["digest"] for d in digests[0]} & {d["digest"] for d in digests[1]}


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_saved_adapter_is_full_shape_trained_and_in_the_measured_dtype(trained, stage):
    from safetensors.torch import load_file

    tensors = load_file(str(trained(stage) / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == EXPECTED_SHAPES
    assert {v.dtype for v in tensors.values()} == {ADAPTER_DTYPE[stage]}
    assert all(v.abs().max() > 0 for k, v in tensors.items() if ".lora_B." in k)  # B starts at 0: it was trained


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_bf16_checkpoint_reloads_decodes_and_merges_to_a_bf16_model(workspace, trained, stage, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from packlora.decoding.cli import decode_file
    from packlora.decoding.generate import load_checkpoint
    from packlora.training.export import export_merged

    out = trained(stage)
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(workspace / "base")
    assert {v.dtype for v in load_file(str(workspace / "base" / "model.safetensors")).values()} == {torch.bfloat16}
    ckpt = load_checkpoint(out, dtype="bfloat16", device="cpu")
    assert next(ckpt.model.get_base_model().parameters()).dtype == torch.bfloat16
    rows = decode_file(ckpt, out / "heldout.jsonl", tmp_path / "decoded.jsonl")
    assert len(rows) == HOLDOUT and all(r["stop_reason"] in ("stop_id", "max_new_tokens") for r in rows), rows
    assert len((out / "decoded.jsonl").read_text().splitlines()) == HOLDOUT  # the run decoded its hold-out too

    merged_dir = export_merged(out, tmp_path / "merged")
    assert {v.dtype for v in load_file(str(merged_dir / "model.safetensors")).values()} == {torch.bfloat16}
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 2, 1, 50, 51, 52]])
    with torch.no_grad():
        want = ckpt.model(input_ids=ids, use_cache=False).logits.float()
        got = merged(input_ids=ids, use_cache=False).logits.float()
    # bf16 keeps 8 bits of mantissa: merging W + s*B@A rounds once more than applying it on the fly.
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 2e-2, f"merged vs base+adapter logits differ by {rel:.3e} (relative)"
