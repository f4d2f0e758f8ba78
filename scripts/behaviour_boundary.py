"""The behaviour-boundary experiment: legacy labels vs assistant-only labels, with and without stop ids.

    python scripts/behaviour_boundary.py --fresh    # ~10 min on 2 idle CPU cores (3x that when shared)

What it does, all on CPU, all on the real 世说新语 data in ../shared/data/shishuo:

1. Trains a byte-level BPE tokenizer (``tokenizers``) on the stage-1 text and the chats, with the
   ChatML specials ``<|endoftext|>`` (= eos, as in Qwen2 base tokenizers), ``<|im_start|>``,
   ``<|im_end|>`` and the Qwen2 ChatML template.
2. Stage 1: trains a tiny Qwen2-architecture base in full (``lora: null``) on the stage-1 text.
3. Stage 2, twice from that base, LoRA on the same chats (a fixed train split):
   ``data.labels: legacy_full_sequence`` (whole ChatML text trained, packed without isolation:
   the bug) and ``assistant_only`` (packlora's default, segments isolated).
4. ``eval-runaway`` on the same held-out chats, each model with its stop ids and with
   ``--no-stop-ids`` (stop at ``<|endoftext|>`` only, as a chat-unaware decoder would).
5. Writes the table and the per-run numbers to ``docs/behaviour-boundary.md`` (and the raw
   reports next to the runs, under ``--work-dir``).

Steps whose output exists from the same settings are reused (a changed setting redoes that step
and the ones after it); ``--fresh`` deletes ``--work-dir`` first.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
STAGE1 = SHARED / "data" / "shishuo" / "stage1_text.jsonl"
CHATS = SHARED / "data" / "shishuo" / "stage2_rewrite.jsonl"
CHAT_TEMPLATE = SHARED / "assets" / "qwen2-tokenizer" / "chat_template.jinja"
DOC = REPO / "docs" / "behaviour-boundary.md"

SEED = 0
VOCAB = 3000
MODEL = dict(model_type="qwen2", hidden_size=192, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
ARMS = {"legacy": "legacy_full_sequence", "assistant_only": "assistant_only"}
ROW_NAMES = {"legacy": "legacy labels (full sequence, no isolation)", "assistant_only": "assistant-only + isolation"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", default=str(REPO / "runs" / "behaviour-boundary"))
    ap.add_argument("--stage1-steps", type=int, default=1200)
    ap.add_argument("--stage2-steps", type=int, default=600)
    ap.add_argument("--train-chats", type=int, default=3000)
    ap.add_argument("--heldout", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--fresh", action="store_true", help="delete --work-dir first")
    ap.add_argument("--doc", default=str(DOC))
    args = ap.parse_args(argv)
    work = Path(args.work_dir)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        build_tokenizer(tok_dir)
    train_file, heldout_file, split_changed = split_chats(work, args.train_chats, args.heldout)

    stage1 = work / "stage1"
    retrained = run_training(work / "stage1.yaml", stage1 / "config.json", {
            "output_dir": str(stage1), "seed": SEED, "deepspeed": None,
            "model": {"config": MODEL, "tokenizer": str(tok_dir), "attn_implementation": "sdpa"},
            "lora": None,
            "data": {"train": [str(STAGE1)], "max_seq_length": 128},
            "training": _training(args.stage1_steps, lr=1.0e-3, batch=8),
            "decoding": {"max_new_tokens": args.max_new_tokens},
        })
    reports = {}
    for arm, labels in ARMS.items():
        out = work / f"stage2-{arm}"
        arm_retrained = run_training(work / f"stage2-{arm}.yaml", out / "adapter_model.safetensors", {
                "output_dir": str(out), "seed": SEED, "deepspeed": None,
                "model": {"name_or_path": str(stage1), "attn_implementation": "sdpa"},
                "lora": {"r": 32, "alpha": 64, "dropout": 0.0,
                         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"]},
                "data": {"train": [str(train_file)], "max_seq_length": 512, "labels": labels},
                "training": _training(args.stage2_steps, lr=2.0e-3, batch=2),
                "decoding": {"max_new_tokens": args.max_new_tokens},
            }, force=retrained or split_changed)
        for mode in ("stop_ids", "no_stop_ids"):
            report = out / f"runaway-{mode}.json"
            stale = not report.is_file() or json.loads(report.read_text())["max_new_tokens"] != args.max_new_tokens
            if arm_retrained or split_changed or stale:
                cmd = [sys.executable, "-m", "packlora", "eval-runaway", str(out), "--input", str(heldout_file),
                       "--output", str(report), "--max-new-tokens", str(args.max_new_tokens), "--batch-size", "16"]
                _run(cmd + (["--no-stop-ids"] if mode == "no_stop_ids" else []))
            reports[arm, mode] = json.loads(report.read_text())
    # Compute time summed over the invocations that built this work dir (steps are reused).
    elapsed_file = work / "elapsed_s.json"
    elapsed = (json.loads(elapsed_file.read_text()) if elapsed_file.is_file() else 0.0) + time.time() - t0
    elapsed_file.write_text(json.dumps(round(elapsed, 1)))
    write_doc(Path(args.doc), reports, args, elapsed)
    print(f"wrote {args.doc}")
    return 0


def _training(steps: int, lr: float, batch: int) -> dict:
    return dict(max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr, lr_scheduler_type="cosine",
                warmup_steps=max(1, steps // 20), logging_steps=10, save_steps=10 * steps, report_to=[],
                weight_decay=0.0)


def build_tokenizer(out_dir: Path) -> None:
    """Byte-level BPE on this corpus; ``<|endoftext|>`` = 0 (eos, pad), ``<|im_start|>`` = 1, ``<|im_end|>`` = 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in STAGE1.open(encoding="utf-8")]
    for line in CHATS.open(encoding="utf-8"):
        texts += [m["content"] for m in json.loads(line)["messages"]]
    texts += ["system\nuser\nassistant\n"] * 10
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE.read_text()
    fast.save_pretrained(out_dir)


def split_chats(work: Path, n_train: int, n_heldout: int) -> tuple[Path, Path, bool]:
    """A seeded, disjoint train / held-out split of the real chats (the same for both arms);
    the bool says whether the files changed."""
    train_file, heldout_file = work / "train_chats.jsonl", work / "heldout_chats.jsonl"
    lines = CHATS.read_text(encoding="utf-8").splitlines()
    random.Random(SEED).shuffle(lines)
    held, train = "\n".join(lines[:n_heldout]) + "\n", "\n".join(lines[n_heldout : n_heldout + n_train]) + "\n"
    changed = False
    for path, text in ((heldout_file, held), (train_file, train)):
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            changed = True
    return train_file, heldout_file, changed


def run_training(config_path: Path, done_file: Path, config: dict, force: bool = False) -> bool:
    """Train unless ``done_file`` exists from a run with this very config; returns True if it trained."""
    text = yaml.safe_dump(config, allow_unicode=True, sort_keys=False)
    if not force and done_file.is_file() and config_path.is_file() and config_path.read_text(encoding="utf-8") == text:
        return False
    shutil.rmtree(config["output_dir"], ignore_errors=True)  # a stale run would be resumed or mixed in
    config_path.write_text(text, encoding="utf-8")
    _run([sys.executable, "-m", "packlora.train", str(config_path)])
    return True


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    t = time.time()
    subprocess.run(cmd, cwd=REPO, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    print(f"  ({time.time() - t:.0f} s)", flush=True)


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def write_doc(path: Path, reports: dict, args, seconds: float) -> None:
    rows = []
    for arm in ARMS:
        s, n = reports[arm, "stop_ids"], reports[arm, "no_stop_ids"]
        rows.append(
            f"| {ROW_NAMES[arm]} | {_pct(n['emitted_end_of_turn'])} | {_pct(s['runaway'])} | {_pct(n['runaway'])} "
            f"| {_pct(s['role_leak'])} / {_pct(n['role_leak'])} "
            f"| {s['mean_length_ratio']:.2f} / {n['mean_length_ratio']:.2f} |"
        )
    detail = []
    for (arm, mode), r in reports.items():
        detail.append(
            f"| {arm} | {mode} | {r['num_prompts']} | {_pct(r['stopped_by_stop_id'])} | {_pct(r['emitted_end_of_turn'])} "
            f"| {_pct(r['hit_max_new_tokens'])} | {_pct(r['role_leak'])} | {_pct(r['runaway'])} "
            f"| {r['mean_length_ratio']:.2f} |"
        )
    leg_s, leg_n = reports["legacy", "stop_ids"]["runaway"], reports["legacy", "no_stop_ids"]["runaway"]
    removed = "n/a (no runaway without stop ids)" if leg_n == 0 else f"{100 * (1 - leg_s / leg_n):.0f}%"
    examples = []
    for arm in ARMS:
        worst = reports[arm, "no_stop_ids"]["worst"][:1]
        for w in worst:
            examples.append(f"{ROW_NAMES[arm]}, without stop ids ({Path(w['source']).name}):\n\n```\n{w['reply'][:400]}\n```\n")
    settings = (f"stage 1: {args.stage1_steps} steps; stage 2: {args.stage2_steps} steps on {args.train_chats} "
                f"chats; {args.heldout} held-out chats; greedy, max_new_tokens {args.max_new_tokens}")
    path.parent.mkdir(parents=True, exist_ok=True)
    notes = NOTES_MARKER + "\n\n(Explain the measured numbers here; this part is kept when the table is regenerated.)\n"
    if path.is_file() and NOTES_MARKER in path.read_text(encoding="utf-8"):
        notes = NOTES_MARKER + path.read_text(encoding="utf-8").split(NOTES_MARKER, 1)[1]
    path.write_text(DOC_TEMPLATE.format(
        table="\n".join(rows), detail="\n".join(detail), removed=removed, settings=settings,
        minutes=f"{seconds / 60:.0f}", examples="\n".join(examples), model=json.dumps(MODEL), vocab=VOCAB,
    ) + notes, encoding="utf-8")


NOTES_MARKER = "<!-- Hand-written notes below this line are kept by scripts/behaviour_boundary.py -->"


DOC_TEMPLATE = """# The behaviour boundary: does the model end its turn?

<!-- Generated by scripts/behaviour_boundary.py; edit the script, not this table. -->

Regenerate (about {minutes} min of compute when it last ran, on 2 CPU cores; steps whose output
exists under `--work-dir` are reused, `--fresh` redoes them all):

    python scripts/behaviour_boundary.py --fresh

Setup ({settings}): a {vocab}-token byte-level BPE tokenizer trained on this corpus with the ChatML
specials (eos = `<|endoftext|>`, as in Qwen2 base tokenizers); a tiny Qwen2-architecture base
`{model}` trained in full (`lora: null`) on the 世说新语 stage-1 text; then two LoRA runs from it
on the same real chats, differing only in `data.labels`; then `packlora eval-runaway` on the same
held-out chats with the checkpoint's stop ids and with `--no-stop-ids` (the decoder stops at
`<|endoftext|>` only, as a chat-unaware decoder does). Metric definitions: `decoding/runaway.py`.

| labels | emitted end of turn | runaway with stop IDs | runaway without stop IDs | role leak (with / without stop IDs) | mean length ratio (with / without stop IDs) |
|---|---|---|---|---|---|
{table}

Stop ids alone removed {removed} of the legacy model's runaway.

All numbers:

| run | decoder | prompts | stopped by stop id | emitted end of turn | hit max_new_tokens | role leak | runaway | mean length ratio |
|---|---|---|---|---|---|---|---|---|
{detail}

The worst reply of each model without stop ids:

{examples}
"""


if __name__ == "__main__":
    sys.exit(main())
