"""One rank of a throughput run (started 2x by ``benchmarks/throughput.py`` under the deepspeed CLI).

    deepspeed --num_accelerators 2 --no_local_rank benchmarks/throughput_worker.py VARIANT BASE_DIR OUT.json STEPS WARM L

Variants: ``packlora_sdpa`` / ``packlora_packed_sdpa`` (packed rows, isolation by sdpa's block mask /
SDPA per segment), ``packlora_full_logits`` (as ``packlora_sdpa`` with ``lm_head_positions: all``),
``padded_unpacked``, ``packlora_no_isolation``, ``trl_like_for_like`` and ``trl_defaults`` (see
``throughput.py``). The packlora variants train with ``PackloraTrainer``, as ``packlora launch`` does.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from packlora.training import distributed  # noqa: E402

SHISHUO = REPO.parent / "shared" / "data" / "shishuo" / "stage2_rewrite.jsonl"
L = 1024  # row length; set from the command line
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def main(variant: str, base_dir: str, out_json: str, steps: int, warm: int) -> None:
    distributed.configure()
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    tok = AutoTokenizer.from_pretrained(base_dir)
    common = dict(output_dir=str(Path(out_json).with_suffix("")), max_steps=steps, learning_rate=1e-3,
                  logging_steps=1000, save_strategy="no", report_to=[], seed=0, data_seed=0,
                  deepspeed=str(REPO / "ds_configs" / "zero2.json"), remove_unused_columns=False)
    if variant.startswith("trl_"):
        trainer = _trl_trainer(variant, tok, base_dir, common, LoraConfig(task_type="CAUSAL_LM", **LORA))
    else:
        trainer = _packlora_trainer(variant, tok, base_dir, common, LoraConfig(task_type="CAUSAL_LM", **LORA))

    counts: dict[int, list[int]] = {}  # step -> [supervised tokens, real tokens, token slots]
    original_step = trainer.training_step

    def counting_step(model, inputs, num_items_in_batch=None):
        labels = inputs["labels"]
        real = labels.numel() if variant != "padded_unpacked" else int((inputs["input_ids"] != tok.pad_token_id).sum())
        c = counts.setdefault(trainer.state.global_step, [0, 0, 0])
        c[0] += int((labels[..., 1:] != -100).sum())
        c[1] += real
        c[2] += labels.numel()
        return original_step(model, inputs, num_items_in_batch)

    trainer.training_step = counting_step
    ends: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            ends[state.global_step] = time.perf_counter()

    trainer.add_callback(Clock())
    trainer.train()
    # the first `warm` steps warm up (allocator, first all-reduce) and are not timed
    measured = [s for s in range(warm, steps)]
    local = torch.tensor([sum(counts[s][i] for s in measured) for i in range(3)], dtype=torch.float64)
    torch.distributed.all_reduce(local)
    if trainer.is_world_process_zero():
        seconds = ends[steps] - ends[warm]
        Path(out_json).write_text(json.dumps({
            "variant": variant, "measured_steps": len(measured), "seconds": seconds,
            "supervised_tokens": int(local[0]), "supervised_tokens_per_s": float(local[0]) / seconds,
            "tokens_per_s": float(local[1]) / seconds,
            "real_token_fraction": float(local[1] / local[2]),
        }))


def _packlora_trainer(variant, tok, base_dir, common, lora):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments, set_seed

    from packlora.data_utils.collator import PackedCollator
    from packlora.data_utils.chat_format import ChatFormat
    from packlora.data_utils.config import DataConfig
    from packlora.data_utils.dataset import prepare_data
    from packlora.training import packed_attention  # noqa: F401  (registers packed_sdpa)
    from packlora.training.isolation import install_isolation_guard
    from packlora.training.trainer import PackloraTrainer

    packed = variant != "padded_unpacked"
    args = TrainingArguments(per_device_train_batch_size=1 if packed else 8, **common)
    with args.main_process_first():
        data = prepare_data(DataConfig(train=[str(SHISHUO)], max_seq_length=L, packing=packed), ChatFormat(tok))
    attn = "packed_sdpa" if variant == "packlora_packed_sdpa" else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32", attn_implementation=attn)
    model.config.use_cache = False
    install_isolation_guard(model)
    set_seed(0)
    model = get_peft_model(model, lora)
    collator = PackedCollator(pad_token_id=tok.pad_token_id, isolate_segments=variant != "packlora_no_isolation")
    if variant == "packlora_no_isolation":
        collator = _same_labels_as_isolated(collator)
    positions = "all" if variant == "packlora_full_logits" else "supervised"
    return PackloraTrainer(model=model, args=args, train_dataset=data.rows, data_collator=collator,
                           lm_head_positions=positions)


def _same_labels_as_isolated(collator):
    """Positions run on across the row (no attention isolation) but the labels are exactly those of
    the isolated run (first label of every segment masked), so both variants train the same tokens
    and the ratio measures the attention alone."""
    import torch

    def collate(rows):
        batch = collator(rows)
        for b, r in enumerate(rows):
            starts = torch.cumsum(torch.tensor([0, *r["seq_lens"][:-1]]), 0)
            batch["labels"][b, starts] = -100
        return batch

    return collate


def _trl_trainer(variant, tok, base_dir, common, lora):
    """TRL's SFTTrainer on the same chats and labels: ``assistant_only_loss`` on the ``{% generation %}``
    copy of the template (every reply and its <|im_end|>, as packlora; ``data_prep_bench.py`` checks
    the labels are identical), BFD packing into rows of L, padding-free, fp32. ``trl_like_for_like``
    turns TRL's activation checkpointing off (packlora runs without it); ``trl_defaults`` keeps
    SFTConfig's default (on). TRL 1.16 has no setting for its per-step entropy and token-accuracy
    metrics (its fused LM head always computes them), so both variants pay for them."""
    import datasets
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTConfig, SFTTrainer

    from data_prep_bench import GENERATION_TEMPLATE

    tok.chat_template = GENERATION_TEMPLATE
    rows = [{"messages": json.loads(line)["messages"]} for line in SHISHUO.read_text(encoding="utf-8").splitlines()]
    ds = datasets.Dataset.from_list(rows)
    extra = {"activation_checkpointing": False} if variant == "trl_like_for_like" else {}
    args = SFTConfig(per_device_train_batch_size=1, max_length=L, packing=True, packing_strategy="bfd",
                     assistant_only_loss=True, dataset_num_proc=1, bf16=False, **extra, **common)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="float32", attn_implementation="sdpa")
    set_seed(0)
    return SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=lora)


if __name__ == "__main__":
    L = int(sys.argv[6])
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
