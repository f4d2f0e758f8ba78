"""``packlora.train.main`` end to end in this process (no launcher, no DeepSpeed, CPU, fp32), and
the stop IDs surviving every documented way of loading what it wrote.

One tiny run (module fixture, ~15 s): a 2-layer Qwen2 built from a config, the real Qwen2
tokenizer (so the stop IDs are the real ``<|im_end|>`` = 151645 and ``<|endoftext|>`` = 151643),
LoRA on q/v, 4 steps on 24 real 世说新语 chats, a checkpoint at step 2, 2 held-out prompts decoded
after training. Then:

* the smoke checks: LoRA weights moved from their init, only LoRA tensors were optimised (the
  base stays frozen), the checkpoint file set is complete;
* each load path (the README snippet as written there, ``AutoPeftModelForCausalLM``, the merged
  export, ``packlora decode``) gives ``eos_token_id == [151645, 151643]`` and a ``generate()``
  that stops at ``<|im_end|>``, with the model's logits replaced by a script that writes two
  tokens, ``<|im_end|>``, then a made-up next turn.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from tiny_assets import QWEN2_TOKENIZER, REPO_ROOT, SHISHUO_CHATS, tiny_qwen2_config

IM_START, IM_END, ENDOFTEXT = 151644, 151645, 151643
STOP_IDS = [IM_END, ENDOFTEXT]
MAX_STEPS, SAVE_STEPS, RECORDS, HOLDOUT = 4, 2, 24, 2
# What the scripted model writes after any prompt: "好" "。" <|im_end|> then an invented user turn.
SCRIPT = [52801, 1773, IM_END, 198, IM_START, 872, 198, 52801]
CHECKPOINT_FILES = {
    "adapter_config.json", "adapter_model.safetensors", "generation_config.json", "tokenizer.json",
    "tokenizer_config.json", "chat_template.jinja", "packlora_config.yaml", "packlora_complete.json",
    "trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin",
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Train once with ``packlora.train.main`` and return the run's output_dir."""
    from packlora import train

    ws = tmp_path_factory.mktemp("smoke")
    chats = ws / "chats.jsonl"
    with open(SHISHUO_CHATS, encoding="utf-8") as f:
        chats.write_text("".join(next(f) for _ in range(RECORDS)), encoding="utf-8")
    model_config = tiny_qwen2_config(0, initializer_range=0.2)
    del model_config["vocab_size"]  # default: the tokenizer's length
    config = {
        "output_dir": str(ws / "run"),
        "seed": 0,
        "deepspeed": None,
        "model": {"config": model_config, "tokenizer": str(QWEN2_TOKENIZER), "attn_implementation": "sdpa"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": [str(chats)], "max_seq_length": 512, "eval_holdout": HOLDOUT,
                 "cache_dir": str(ws / "cache")},
        "training": {"max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "learning_rate": 1e-2,
                     "per_device_train_batch_size": 2, "report_to": [], "use_cpu": True},
        "decoding": {"max_new_tokens": 8},
    }
    (ws / "run.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    mp = pytest.MonkeyPatch()
    mp.setenv("TENSORBOARD_LOGGING_DIR", str(ws / "tb"))
    try:
        assert train.main([str(ws / "run.yaml")]) == 0
    finally:
        mp.undo()
    return ws / "run"


# ---------------------------------------------------------------------------------------- smoke


def test_main_writes_a_complete_checkpoint_and_a_final_adapter(run_dir):
    ckpt = run_dir / f"checkpoint-{SAVE_STEPS}"
    assert CHECKPOINT_FILES <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "packlora_complete.json").read_text()) == {"global_step": SAVE_STEPS}
    assert {"adapter_model.safetensors", "generation_config.json", "packlora_config.yaml"} <= {
        p.name for p in run_dir.iterdir()}
    assert not (ckpt / "model.safetensors").exists()  # only the adapter is saved, never the base
    report = json.loads((run_dir / "data_report.json").read_text())
    assert (report["records"], report["heldout"], report["role_markers_in_labels"]) == (RECORDS, HOLDOUT, 0)
    decoded = [json.loads(line) for line in open(run_dir / "decoded.jsonl", encoding="utf-8")]
    assert len(decoded) == HOLDOUT


def test_lora_weights_change_and_only_lora_weights_are_optimised(run_dir):
    from safetensors.torch import load_file

    adapter = load_file(str(run_dir / "adapter_model.safetensors"))
    # 2 layers x (q, v) x (A, B), at full shape: A (r, hidden), B (out, r); q out 64, v out 32.
    assert {k: tuple(v.shape) for k, v in adapter.items()} == {
        f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{ab}.weight": shape
        for i in range(2)
        for p, ab, shape in (("q_proj", "A", (4, 64)), ("q_proj", "B", (64, 4)),
                             ("v_proj", "A", (4, 64)), ("v_proj", "B", (32, 4)))
    }
    assert all(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)  # B starts at zero
    optimizer = torch.load(run_dir / f"checkpoint-{SAVE_STEPS}" / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(adapter)  # the optimiser held the LoRA tensors and nothing else


# ----------------------------------------------------------------- stop IDs on every load path


def _script(model) -> None:
    """Replace the model's next-token logits with ``SCRIPT`` (one entry per generate step)."""
    head = model.get_output_embeddings()
    step = {"k": 0}

    def hook(_module, _inputs, logits):
        scripted = torch.full_like(logits, -1e4)
        scripted[:, -1, SCRIPT[min(step["k"], len(SCRIPT) - 1)]] = 1e4
        step["k"] += 1
        return scripted

    head.register_forward_hook(hook)


def _generates_until_im_end(model, tokenizer) -> list[int]:
    """The new ids of a plain ``model.generate()`` under its own generation config, scripted."""
    _script(model)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "改写：他笑了。"}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=len(SCRIPT), do_sample=False)
    return out[0, prompt["input_ids"].shape[1]:].tolist()


def test_readme_snippet_loads_the_stop_ids_and_generate_stops_at_im_end(run_dir):
    from transformers import AutoTokenizer

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    snippet = re.search(r"A checkpoint loads with plain PEFT.*?```python\n(.*?)```", readme, re.S).group(1)
    scope: dict = {}
    exec(snippet.replace("runs/shishuo-tiny", str(run_dir)), scope)  # the README's code, as written
    model = scope["model"].eval()
    assert model.generation_config.eos_token_id == STOP_IDS
    assert _generates_until_im_end(model, AutoTokenizer.from_pretrained(run_dir)) == SCRIPT[:3]


def test_plain_peft_load_without_generation_config_line_still_stops(run_dir):
    """The base packlora saved carries the stop IDs itself: the trap of issue 16."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(run_dir / "base_model")
    model = PeftModel.from_pretrained(base, run_dir).eval()
    assert model.generation_config.eos_token_id == STOP_IDS
    assert _generates_until_im_end(model, AutoTokenizer.from_pretrained(run_dir)) == SCRIPT[:3]


def test_auto_peft_model_loads_the_stop_ids_and_stops_at_im_end(run_dir):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(run_dir).eval()
    assert model.generation_config.eos_token_id == STOP_IDS
    assert _generates_until_im_end(model, AutoTokenizer.from_pretrained(run_dir)) == SCRIPT[:3]


def test_merged_export_loads_the_stop_ids_and_stops_at_im_end(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from packlora.training.export import main as export

    assert export([str(run_dir), "--merge", str(tmp_path / "merged")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert model.generation_config.eos_token_id == STOP_IDS
    assert _generates_until_im_end(model, AutoTokenizer.from_pretrained(tmp_path / "merged")) == SCRIPT[:3]


def test_packlora_decode_uses_the_stop_ids_and_cuts_the_reply_at_im_end(run_dir, tmp_path, monkeypatch):
    from packlora.decoding import generate
    from packlora.decoding.cli import decode_file

    loaded = generate.load_checkpoint(run_dir, device="cpu")
    assert list(loaded.stop_ids) == STOP_IDS
    assert loaded.model.generation_config.eos_token_id == STOP_IDS
    _script(loaded.model)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "改写：他笑了。"}]}) + "\n")
    [row] = decode_file(loaded, prompts, tmp_path / "out.jsonl")
    assert (row["stop_reason"], row["num_new_tokens"], row["reply"]) == ("stop_id", 3, "好。")


# ------------------------------------------------------------- one run per output_dir (issue 24)


def test_a_second_run_into_the_same_output_dir_is_refused_before_any_work(run_dir, capsys):
    """The README's sequence, in-process: a run, then another into its output_dir without a resume."""
    from packlora import train

    before = sorted(p.name for p in run_dir.iterdir())
    assert train.main([str(run_dir.parent / "run.yaml"), "training.max_steps=2"]) == 1
    err = capsys.readouterr().err
    assert f"output_dir: {run_dir} already holds a run (checkpoint-{SAVE_STEPS}, checkpoint-{MAX_STEPS}, " \
           "packlora_config.yaml)" in err
    assert "Give a new output_dir" in err and "or add --overwrite to delete the old run first" in err
    assert sorted(p.name for p in run_dir.iterdir()) == before  # nothing written, nothing deleted


def test_a_resume_from_the_last_checkpoint_with_no_steps_left_is_refused_with_both_numbers(run_dir, capsys):
    from packlora import train

    argv = [str(run_dir.parent / "run.yaml"), "training.resume_from_checkpoint=auto"]
    assert train.main(argv) == 1
    assert (f"training.resume_from_checkpoint: {run_dir / f'checkpoint-{MAX_STEPS}'} is at step {MAX_STEPS} and "
            f"training.max_steps is {MAX_STEPS}: nothing is left to train") in capsys.readouterr().err


# ---------------------------------------------------------------------- a run moved elsewhere


def test_a_moved_run_decodes_exports_and_resumes(run_dir, tmp_path, monkeypatch):
    """Last in this file: it moves the module's run for good (the recorded base path goes stale)."""
    import shutil

    from packlora.decoding.decode import decode_file
    from packlora import train
    from packlora.training.export import main as export

    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(str(run_dir), str(moved))
    recorded = json.loads((moved / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert not Path(recorded).exists()  # PEFT's own path is stale; packlora finds moved/base_model
    rows = decode_file(moved, moved / "heldout.jsonl", tmp_path / "decoded.jsonl")
    assert len(rows) == HOLDOUT
    assert export([str(moved / f"checkpoint-{SAVE_STEPS}"), "--merge", str(tmp_path / "merged")]) == 0
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    config = run_dir.parent / "run.yaml"
    assert train.main([str(config), f"output_dir={moved}", f"training.max_steps={MAX_STEPS + 2}",
                       "training.resume_from_checkpoint=auto"]) == 0
    state = json.loads((moved / f"checkpoint-{MAX_STEPS + 2}" / "trainer_state.json").read_text())
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps[-2:] == [MAX_STEPS + 1, MAX_STEPS + 2]  # continued from checkpoint-4, not from step 0
