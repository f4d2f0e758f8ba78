"""A resume under changed batch settings continues at the next unseen row, or is refused before
training: ``packlora.train.main`` in this process (one CPU process, no DeepSpeed, tiny Qwen2).

The data: 16 chats of exactly 71 tokens each, packed two to a row of 142 tokens, so the run has 8
full rows (no padding: a row's ``input_ids`` identify it). Steps 1-2 train with micro-batch 1 x
accumulation 2 (2 rows per step). Resumed at checkpoint-2:

* micro-batch 2 x accumulation 1 (still 2 rows per step): steps 3-4 train the 4 rows not trained
  yet, so the 8 rows of the epoch are trained exactly once each;
* micro-batch 1 x accumulation 1 (1 row per step): the Trainer would skip 2 x 1 micro-batches, i.e.
  2 rows, and train rows 3 and 4 a second time (transformers #5605); refused, naming
  ``training.gradient_accumulation_steps`` with both values.
"""
from __future__ import annotations

import json

import pytest
import yaml

ROWS, ROW_TOKENS, EXAMPLE_TOKENS = 8, 142, 71


def _chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Question number {i}: how are you today?"},
                         {"role": "assistant", "content": f"I am fine, thank you ({i})."}]}


@pytest.fixture
def trained_rows(monkeypatch):
    """Every row each optimizer micro-step trains on, as a tuple of token ids, in order."""
    from packlora.training.trainer import PackloraTrainer

    seen: list[tuple[int, ...]] = []
    real = PackloraTrainer.training_step

    def record(self, model, inputs, num_items_in_batch=None):
        seen.extend(tuple(row) for row in inputs["input_ids"].tolist())
        return real(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(PackloraTrainer, "training_step", record)
    return seen


@pytest.fixture
def first_two_steps(tmp_path, chatml_tokenizer_dir, chatml_tokenizer, trained_rows, monkeypatch):
    """Train steps 1-2 (micro-batch 1 x accumulation 2), saving checkpoint-2; returns the config and
    the rows trained."""
    from tiny_assets import tiny_qwen2_config

    from packlora import train

    ids = [i for i in range(10, 30) if i != 23][:16]  # 23 renders to 69 tokens, the others to 71
    lengths = {len(chatml_tokenizer.apply_chat_template(_chat(i)["messages"], tokenize=True,
                                                         return_dict=True)["input_ids"]) for i in ids}
    assert lengths == {EXAMPLE_TOKENS}
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(_chat(i)) + "\n" for i in ids))
    spec = tiny_qwen2_config(0)
    del spec["vocab_size"]
    config = {
        "output_dir": str(tmp_path / "run"), "seed": 0, "deepspeed": None,
        "model": {"config": spec, "tokenizer": str(chatml_tokenizer_dir)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": [str(tmp_path / "chats.jsonl")], "max_seq_length": ROW_TOKENS,
                 "cache_dir": str(tmp_path / "cache")},
        "training": {"max_steps": 2, "save_steps": 2, "per_device_train_batch_size": 1,
                     "gradient_accumulation_steps": 2, "learning_rate": 1e-3, "report_to": [], "use_cpu": True},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    assert train.main([str(tmp_path / "run.yaml")]) == 0
    order = json.loads((tmp_path / "run" / "checkpoint-2" / "packlora_data_order.json").read_text())
    assert {k: order[k] for k in ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps",
                                  "rows_per_step", "max_seq_length", "seed")} == {
        "world_size": 1, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 2, "rows_per_step": 2,
        "max_seq_length": ROW_TOKENS, "seed": 0}
    first = list(trained_rows)
    assert len(first) == 4 and all(len(r) == ROW_TOKENS for r in first)  # 2 steps x 2 full rows
    trained_rows.clear()
    return tmp_path / "run.yaml", first


def test_resume_with_the_same_rows_per_step_trains_every_row_once(first_two_steps, trained_rows, tmp_path):
    from packlora import train

    config, first = first_two_steps
    assert train.main([str(config), "training.max_steps=4", "training.per_device_train_batch_size=2",
                       "training.gradient_accumulation_steps=1", "training.resume_from_checkpoint=auto"]) == 0
    resumed = list(trained_rows)
    assert len(resumed) == 4  # steps 3 and 4, one micro-batch of 2 rows each
    everything = first + resumed
    assert len(set(everything)) == ROWS == len(everything)  # 8 distinct rows, none twice, so none skipped
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h][-2:] == [3, 4]


def test_resume_with_another_gradient_accumulation_is_refused_before_training(first_two_steps, trained_rows, capsys):
    from packlora import train

    config, _ = first_two_steps
    assert train.main([str(config), "training.max_steps=4", "training.gradient_accumulation_steps=1",
                       "training.resume_from_checkpoint=auto"]) == 1
    err = capsys.readouterr().err
    assert "training.gradient_accumulation_steps: 2 in the checkpoint, 1 now" in err
    assert "keep processes x per_device_train_batch_size x gradient_accumulation_steps = 2 rows per step" in err
    assert trained_rows == []  # refused before a single step
