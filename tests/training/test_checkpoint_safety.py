"""Atomic checkpoints: a save cut short never leaves a checkpoint that resume would pick, rotation
never deletes the newest complete checkpoint, an incomplete adapter never becomes visible.

The trainer tests run ``PackloraTrainer`` in this process on a tiny Qwen2 + LoRA (one CPU process,
no DeepSpeed, 4 steps, a few seconds); the 2-process ZeRO-2/3 kill-and-resume runs are in
``tests/distributed/test_resume.py``.
"""
import json
from pathlib import Path

import pytest
import torch

from tiny_assets import tiny_qwen2_config
from packlora.core.checkpoint import IncompleteAdapterError
from packlora.training.checkpoint import (
    COMPLETE_MARKER,
    commit_checkpoint,
    find_resume_checkpoint,
    resolve_resume,
    rotate_checkpoints,
)

MAX_STEPS = 4
STOP_IDS = [2, 0]


def _chat(i):
    return {"messages": [{"role": "user", "content": f"Question number {i}: how are you today?"},
                         {"role": "assistant", "content": f"I am fine, thank you ({i})."}]}  # fmt: skip


@pytest.fixture(scope="module")
def rows(chatml_tokenizer, tmp_path_factory):
    from tiny_assets import prepare

    d = tmp_path_factory.mktemp("ckpt_data")
    (d / "chats.jsonl").write_text("".join(json.dumps(_chat(i)) + "\n" for i in range(12)))
    return prepare([str(d / "chats.jsonl")], chatml_tokenizer, max_seq_length=128, cache_dir=d / "cache").rows


def _trainer(out: Path, rows, tokenizer, save_total_limit=None, expected_extra=None, callbacks=(), eval_rows=None,
             **arguments):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments, set_seed

    from packlora.data_utils.collator import PackedCollator
    from packlora.training.trainer import CheckpointExtrasCallback, PackloraTrainer

    spec = {k: v for k, v in tiny_qwen2_config(len(tokenizer)).items() if k != "model_type"}
    set_seed(0)
    base = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **spec), dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(
        output_dir=str(out), max_steps=MAX_STEPS, save_steps=1, save_total_limit=save_total_limit,
        per_device_train_batch_size=1, learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1,
        report_to=[], use_cpu=True, seed=0, data_seed=0, remove_unused_columns=False, **arguments,
    )  # fmt: skip
    extras = CheckpointExtrasCallback(tokenizer, {"seed": 0}, STOP_IDS, 0, 8, model)
    if expected_extra:
        extras.expected = {**extras.expected, **expected_extra}
    return PackloraTrainer(
        model=model, args=args, train_dataset=rows, eval_dataset=eval_rows, data_collator=PackedCollator(pad_token_id=0),
        processing_class=tokenizer, callbacks=[extras, *callbacks],
    )


def _losses(trainer) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in trainer.state.log_history if "loss" in e}


def _names(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)


@pytest.fixture(scope="module")
def uninterrupted(rows, chatml_tokenizer, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    trainer = _trainer(out, rows, chatml_tokenizer, save_total_limit=2)
    trainer.train()
    return out, _losses(trainer)


def test_rotation_keeps_the_newest_complete_checkpoints_and_no_staging_dir(uninterrupted):
    out, losses = uninterrupted
    assert sorted(losses) == [1, 2, 3, 4]
    assert _names(out) == ["checkpoint-3", "checkpoint-4"]  # save_total_limit=2, saved every step
    for step in (3, 4):
        ckpt = out / f"checkpoint-{step}"
        assert json.loads((ckpt / COMPLETE_MARKER).read_text()) == {"global_step": step}
        files = {p.name for p in ckpt.iterdir()}
        # the extras are written inside the atomic save, before the rename
        assert {"adapter_model.safetensors", "packlora_config.yaml", "generation_config.json", "tokenizer.json",
                "trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= files  # fmt: skip
        assert json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"] == STOP_IDS
    assert find_resume_checkpoint(out) == out / "checkpoint-4"


def test_crash_mid_save_keeps_the_previous_checkpoint_and_resume_skips_the_partial_one(
    rows, chatml_tokenizer, tmp_path, monkeypatch, uninterrupted
):
    from packlora.training.trainer import PackloraTrainer

    real = PackloraTrainer._save_rng_state

    def crash_at_step_3(self, output_dir):
        if self.state.global_step == 3:
            raise RuntimeError("simulated crash in the middle of saving checkpoint-3")
        return real(self, output_dir)

    monkeypatch.setattr(PackloraTrainer, "_save_rng_state", crash_at_step_3)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        _trainer(out, rows, chatml_tokenizer).train()
    assert _names(out) == ["checkpoint-1", "checkpoint-2", "tmp-checkpoint-3"]
    partial = out / "tmp-checkpoint-3" / "checkpoint-3"
    assert (partial / "adapter_model.safetensors").is_file() and not (partial / COMPLETE_MARKER).exists()
    assert all((out / f"checkpoint-{s}" / COMPLETE_MARKER).is_file() for s in (1, 2))

    monkeypatch.setattr(PackloraTrainer, "_save_rng_state", real)
    (out / "tmp-checkpoint-1").mkdir()  # as left by a kill between the rename and the staging dir's removal
    resume = resolve_resume("auto", out)
    assert resume == str(out / "checkpoint-2")
    trainer = _trainer(out, rows, chatml_tokenizer)
    trainer.train(resume_from_checkpoint=resume)
    assert _names(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-3", "checkpoint-4"]  # staging dirs cleared
    # steps 3-4 after the resume equal the uninterrupted run's (same seed, fp32, one process)
    resumed, reference = _losses(trainer), uninterrupted[1]
    assert [resumed[s] for s in (3, 4)] == pytest.approx([reference[s] for s in (3, 4)], abs=1e-6)


def test_an_incomplete_adapter_is_never_made_visible(rows, chatml_tokenizer, tmp_path):
    out = tmp_path / "run"
    missing = {"base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": (4, 64)}
    with pytest.raises(IncompleteAdapterError, match=r"missing base_model\.model\.model\.layers\.9\.self_attn"):
        _trainer(out, rows, chatml_tokenizer, expected_extra=missing).train()
    assert _names(out) == ["tmp-checkpoint-1"]
    assert find_resume_checkpoint(out) is None


def test_early_stopping_with_save_total_limit_1_keeps_the_newest_and_the_best_checkpoint(rows, chatml_tokenizer,
                                                                                          tmp_path):
    """``save_total_limit: 1``, ``load_best_model_at_end`` and early stopping (patience 1), evaluating
    and saving every step, with the evaluation losses scripted: 3.0, 2.0 (the best), 2.5 -> early stop
    at step 3. transformers' end-of-training cleanup deleted checkpoint-3, the newest; both survive,
    checkpoint-1 goes, and the model in memory at the end is checkpoint-2's."""
    from safetensors.torch import load_file
    from transformers import EarlyStoppingCallback, TrainerCallback

    scripted = {1: 3.0, 2: 2.0, 3: 2.5}

    class ScriptedEvalLoss(TrainerCallback):  # runs before EarlyStoppingCallback and the best-model choice
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            metrics["eval_loss"] = scripted[state.global_step]

    out = tmp_path / "run"
    trainer = _trainer(out, rows, chatml_tokenizer, save_total_limit=1, eval_rows=rows.select(range(2)),
                       callbacks=[ScriptedEvalLoss(), EarlyStoppingCallback(early_stopping_patience=1)],
                       eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                       metric_for_best_model="loss", greater_is_better=False)
    trainer.train()
    assert trainer.state.global_step == 3 < MAX_STEPS  # stopped early
    assert _names(out) == ["checkpoint-2", "checkpoint-3"]
    assert trainer.state.best_model_checkpoint == str(out / "checkpoint-2")
    assert find_resume_checkpoint(out) == out / "checkpoint-3"
    trainer.save_model(str(tmp_path / "final"))
    final, best = (load_file(str(d / "adapter_model.safetensors")) for d in (tmp_path / "final", out / "checkpoint-2"))
    newest = load_file(str(out / "checkpoint-3" / "adapter_model.safetensors"))
    assert final.keys() == best.keys() and all(final[k].equal(best[k]) for k in final)
    assert any(not final[k].equal(newest[k]) for k in final)  # the best really differs from the newest


# --------------------------------------------------------------------------- helpers, no training


def _fake(out: Path, step: int, complete: bool = True) -> Path:
    d = out / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "trainer_state.json").write_text("{}")
    if complete:
        (d / COMPLETE_MARKER).write_text(json.dumps({"global_step": step}))
    return d


def test_rotation_never_deletes_the_newest_complete_or_a_kept_checkpoint(tmp_path):
    for s in (10, 20, 30, 40):
        _fake(tmp_path, s)
    _fake(tmp_path, 50, complete=False)  # not packlora's, or hand-made: neither counted nor deleted
    deleted = rotate_checkpoints(tmp_path, 1, keep=(tmp_path / "checkpoint-20",))
    assert sorted(p.name for p in deleted) == ["checkpoint-10", "checkpoint-30"]
    assert _names(tmp_path) == ["checkpoint-20", "checkpoint-40", "checkpoint-50"]
    assert rotate_checkpoints(tmp_path, None) == [] and rotate_checkpoints(tmp_path, 0) == []


def test_auto_resume_picks_the_newest_complete_checkpoint(tmp_path):
    assert resolve_resume("auto", tmp_path) is None  # nothing yet: start from step 0
    _fake(tmp_path, 4)
    _fake(tmp_path, 8)
    _fake(tmp_path, 12, complete=False)
    (tmp_path / "tmp-checkpoint-16" / "checkpoint-16").mkdir(parents=True)
    assert resolve_resume("auto", tmp_path) == str(tmp_path / "checkpoint-8")
    assert resolve_resume(None, tmp_path) is None


def test_explicit_resume_from_an_incomplete_or_missing_checkpoint_is_refused(tmp_path):
    _fake(tmp_path, 12, complete=False)
    with pytest.raises(ValueError, match=r"checkpoint-12 is not a complete checkpoint"):
        resolve_resume(str(tmp_path / "checkpoint-12"), tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint-99"):
        resolve_resume(str(tmp_path / "checkpoint-99"), tmp_path)
    ok = _fake(tmp_path, 8)
    assert resolve_resume(str(ok), tmp_path) == str(ok.resolve())


def test_commit_replaces_an_existing_checkpoint_of_the_same_step(tmp_path):
    old = _fake(tmp_path, 6)
    (old / "old.txt").write_text("old")
    new = tmp_path / "tmp-checkpoint-6" / "checkpoint-6"
    new.mkdir(parents=True)
    (new / "new.txt").write_text("new")
    commit_checkpoint(new, old, 6)
    assert sorted(p.name for p in old.iterdir()) == ["new.txt", COMPLETE_MARKER]
    assert _names(tmp_path) == ["checkpoint-6", "tmp-checkpoint-6"]  # the caller removes the empty staging dir
