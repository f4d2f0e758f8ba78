"""See it stop: the runaway bug and packlora's fix, side by side, on 2 CPU cores.

    .venv/bin/python scripts/see_it_stop.py            # 7.0 min the first time on 2 idle cores (README)
    .venv/bin/python scripts/see_it_stop.py --quick    # 1-2 min smoke run of every step, tiny models

The demo's tiny random model never learns to stop, so it shows nothing of what packlora is for.
This command trains two small chat models that do learn, on the real 世说新语 rewrite chats, and
prints their replies to the same held-out prompts:

* **legacy**: every token of every chat trained (``data.labels: legacy_full_sequence``, packed
  without isolation), decoded without stop ids (``--no-stop-ids``: the tokenizer's eos
  ``<|endoftext|>`` only), as the seed's original script did. It ends its answer with
  ``<|im_end|>`` and writes on into an invented ``<|im_start|>user`` turn.
* **packlora**: assistant-only labels, packed with isolation, decoded with the checkpoint's stop
  ids (``<|im_end|>``, ``<|endoftext|>``). It stops at ``<|im_end|>``.

Steps (all seeded; each reused when its output exists from the same settings):

1. The held-out split of ``scripts/behaviour_boundary.py`` (seed 0, 240 chats never seen by the base).
2. A base (= a stage-1 model): ``behaviour_boundary.ensure_base`` with a smaller spec than that
   script's: a byte-level BPE tokenizer and a small Qwen2 pre-trained in full on all the bundled
   text, cached in ``~/.cache/packlora/behaviour-base/<key>`` (``--base-cache``).
3. Two LoRA runs from it (``python -m packlora.train``, one process, no DeepSpeed), the same
   steps, rows and learning rate; only the labels differ.
4. Decoding of the first held-out prompts with Qwen2.5-Instruct's sampling settings (its
   generation_config.json: temperature 0.7, top_p 0.8, top_k 20, repetition_penalty 1.05; seed 0),
   the same for both models; the first ``--show`` are printed side by side, all are counted. Exit
   status 1 if no legacy reply ran into a new turn or no packlora reply stopped at ``<|im_end|>``
   (never in ``--quick``, whose models are too small to learn either).

Every run lands under ``--work-dir`` (default ``runs/see-it-stop``).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import textwrap
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import behaviour_boundary as bb  # noqa: E402  (the split, the base cache, the training subprocess)

REPO = bb.REPO
HELDOUT = 240  # behaviour_boundary's split: the base never saw these chats


@dataclass(frozen=True)
class Spec:
    """Sizes of one mode: the base, the two stage-2 runs and the decoding."""

    base: bb.BaseSpec
    steps: int  # optimizer steps of each stage-2 run
    rows: int  # packed rows per step
    max_seq_length: int
    learning_rate: float
    lora_r: int
    max_new_tokens: int
    prompts: int  # held-out prompts decoded and counted
    train_limit: int | None = None  # stage-2 training chats (None: all 3,194)


SPECS = {
    "full": Spec(base=bb.BaseSpec(vocab_size=2048, model=bb._qwen2(256, 2, 688, 4, 2), max_steps=600, batch_rows=8,
                                  max_seq_length=256, learning_rate=3e-3),
                 steps=200, rows=8, max_seq_length=512, learning_rate=3e-3, lora_r=32, max_new_tokens=96, prompts=24),
    "quick": Spec(base=bb.BaseSpec(vocab_size=512, model=bb._qwen2(32, 1, 64, 2, 1), max_steps=4, batch_rows=2,
                                   max_seq_length=128, learning_rate=3e-3),
                  steps=3, rows=2, max_seq_length=256, learning_rate=2e-3, lora_r=4, max_new_tokens=12, prompts=3,
                  train_limit=60),
}
# Qwen2.5-Instruct's generation_config.json, seeded: a greedy decoder makes a model this small repeat
# one name until max_new_tokens (docs/behaviour-boundary.md), which hides where its reply ends.
DECODER = dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05, seed=0)  # a Sampling
KINDS = {
    "legacy": ("legacy_full_sequence", "legacy labels, decoded without stop ids"),
    "packlora": ("assistant_only", "packlora: assistant-only labels, stop ids"),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny base, 3 steps per run, 3 prompts")
    ap.add_argument("--show", type=int, default=4, help="held-out prompts printed side by side (default 4)")
    ap.add_argument("--work-dir", default=None, help="default runs/see-it-stop (--quick: runs/see-it-stop-quick)")
    ap.add_argument("--base-cache", default=str(Path.home() / ".cache" / "packlora" / "behaviour-base"))
    ap.add_argument("--width", type=int, default=None, help="columns of the side-by-side view (default: the terminal's)")
    args = ap.parse_args(argv)
    spec = SPECS["quick" if args.quick else "full"]
    work = Path(args.work_dir or REPO / "runs" / ("see-it-stop-quick" if args.quick else "see-it-stop"))
    work.mkdir(parents=True, exist_ok=True)
    clock = bb.Clock()
    print(f"see it stop: {'--quick smoke run' if args.quick else 'two small chat models'} in {work} "
          f"(load average {clock.start_load['load_1_5_15']} on {clock.start_load['nproc']} CPUs)", flush=True)

    with clock.phase("base"):
        train_file, heldout_file = bb.split_chats(work, HELDOUT, spec.train_limit)
        base = bb.ensure_base(spec.base, Path(args.base_cache), heldout_file, rebuild=False, with_zhanghenshui=False,
                              attn_implementation="packed_sdpa", role_word_repeats=2000,
                              command="python scripts/see_it_stop.py")
    runs = {}
    for kind in KINDS:
        with clock.phase(kind):
            runs[kind] = train(work, kind, spec, base, train_file)
    with clock.phase("decoding"):
        results = decode(runs, heldout_file, spec)
    clock.finish()
    print_side_by_side(results, min(args.show, spec.prompts), args.width or shutil.get_terminal_size((100, 24)).columns)
    leaked, stopped = print_summary(results, runs, base, spec, clock)
    if args.quick:
        return 0
    if not (leaked and stopped):
        print("NOT SHOWN: expected at least one legacy reply that runs into a new turn and one packlora reply that "
              "stops at <|im_end|>; the runs are under " + str(work), file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------ training


@dataclass
class Run:
    kind: str
    path: Path
    seconds: float
    steps: int
    train_runtime: float  # the Trainer's own time for the steps (no start-up, no data preparation)


def train(work: Path, kind: str, spec: Spec, base: bb.BaseInfo, train_file: Path) -> Run:
    """One stage-2 LoRA run from the base; reused when ``run_info.json`` says it was made from the
    same config and data."""
    labels, _ = KINDS[kind]
    out = work / kind
    config = {
        "output_dir": str(out), "seed": 0, "deepspeed": None,
        # packed_sdpa: SDPA per packed segment, the fast exact backend on CPU; it isolates segments by
        # construction, so the legacy run (packed without isolation, the bug) needs plain sdpa
        "model": {"name_or_path": str(base.path), "attn_implementation": "sdpa" if kind == "legacy" else "packed_sdpa"},
        "lora": {"r": spec.lora_r, "alpha": 2 * spec.lora_r, "dropout": 0.0, "target_modules": bb.LORA_TARGETS},
        "data": {"train": [str(train_file)], "stage": "sft", "max_seq_length": spec.max_seq_length, "labels": labels,
                 "overflow": "drop", "cache_dir": str(work / "cache")},
        "training": {"max_steps": spec.steps, "per_device_train_batch_size": spec.rows,
                     "learning_rate": spec.learning_rate, "lr_scheduler_type": "cosine", "warmup_steps": 0.05,
                     "weight_decay": 0.0, "logging_steps": 10, "save_strategy": "no", "report_to": []},
        "decoding": {"max_new_tokens": spec.max_new_tokens},
    }
    key = {"config": config, "data_sha256": hashlib.sha256(train_file.read_bytes()).hexdigest(), "base": base.key}
    done = out / "run_info.json"
    if done.is_file() and json.loads(done.read_text()).get("key") == key:
        info = json.loads(done.read_text())
        print(f"{kind}: reusing {out} ({info['steps']} steps)", flush=True)
        return Run(kind, out, info["seconds"], info["steps"], info["train_runtime"])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.time()
    bb._train(work / f"{kind}.yaml", config, out / "train.log")
    seconds = time.time() - t0
    runtime = _train_runtime(out / "train.log")
    done.write_text(json.dumps({"key": key, "seconds": round(seconds, 1), "steps": spec.steps,
                                "train_runtime": runtime}, indent=1))
    return Run(kind, out, seconds, spec.steps, runtime)


def _train_runtime(log: Path) -> float:
    """The Trainer's ``train_runtime`` (seconds) from a training log."""
    found = re.findall(r"'train_runtime': '([0-9.]+)'", log.read_text(errors="replace"))
    return float(found[-1]) if found else float("nan")


# ------------------------------------------------------------------------------------ decoding


def decode(runs: dict[str, Run], heldout_file: Path, spec: Spec) -> dict[str, list[dict]]:
    """Replies of both models to the first ``spec.prompts`` held-out prompts (``DECODER``): legacy
    with the chat-unaware stop ids (``naive_stop_ids``, what ``--no-stop-ids`` uses), packlora with
    the checkpoint's. Each result: the ``PromptResult`` fields (``role_leak``: the reply wrote a new
    turn) plus the prompt, the stop token and ``user_turn`` (it wrote ``<|im_start|>user``)."""
    from packlora.decoding.decode import read_prompts
    from packlora.decoding.generate import Sampling, generate_replies, load_checkpoint
    from packlora.decoding.runaway import naive_stop_ids, score_reply

    prompts = read_prompts(heldout_file, spec.prompts)
    out = {}
    for kind, run in runs.items():
        ckpt = load_checkpoint(run.path, "float32", "cpu")
        stop_ids = naive_stop_ids(ckpt.fmt) if kind == "legacy" else list(ckpt.stop_ids)
        replies = generate_replies(ckpt.model, ckpt.fmt, [list(p.messages) for p in prompts], stop_ids,
                                   max_new_tokens=spec.max_new_tokens, batch_size=len(prompts),
                                   sampling=Sampling(**DECODER))
        header = ckpt.fmt.spec.header_start
        rows = []
        for p, r in zip(prompts, replies, strict=True):
            row = dataclasses.asdict(score_reply(r, p.reference, ckpt.fmt, str(p.source)))
            row.update(prompt=p.messages[-1]["content"], stop_ids=", ".join(ckpt.tokenizer.convert_ids_to_tokens(stop_ids)),
                       stop_token=None if r.stop_id is None else ckpt.tokenizer.convert_ids_to_tokens(r.stop_id),
                       user_turn=f"{header}user" in r.text)
            rows.append(row)
        out[kind] = rows
    return out


# ------------------------------------------------------------------------------------ printing


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _wrap(text: str, width: int) -> list[str]:
    """``text`` cut into lines of at most ``width`` terminal columns (CJK characters take 2); its
    own line breaks kept, a control token such as ``<|im_end|>`` never cut."""
    lines = []
    for para in text.split("\n"):
        line = ""
        for c in re.findall(r"<\|[^|<>]*\|>|.", para):
            if line and _width(line + c) > width:
                lines.append(line)
                line = ""
            line += c
        lines.append(line)
    return lines


def _pad(line: str, width: int) -> str:
    return line + " " * max(0, width - _width(line))


def _ending(row: dict) -> str:
    if row["stop_reason"] == "stop_id":
        return f"■ stopped at {row['stop_token']}"
    return f"… cut at max_new_tokens ({row['num_new_tokens']})"


def print_side_by_side(results: dict[str, list[dict]], show: int, columns: int) -> None:
    col = max(24, (columns - 3) // 2)
    for i in range(show):
        left, right = results["legacy"][i], results["packlora"][i]
        print("\n" + "━" * (2 * col + 3))
        print(f"held-out prompt {i + 1} ({left['source'].rsplit('/', 1)[-1]}):")
        print(textwrap.indent("\n".join(_wrap(left["prompt"], 2 * col)), "  "))
        print(f"reference answer: {left['reference']}")
        heads = [["legacy: whole-chat labels,", f"stops at {left['stop_ids']} only (--no-stop-ids)"],
                 ["packlora: assistant-only labels,", f"stops at {right['stop_ids']}"]]
        bodies = []
        for row, head in zip((left, right), heads):
            body = [h[:col] for h in head] + ["─" * col] + _wrap(row["reply"].replace("\n", "↵\n"), col)
            body += _wrap(_ending(row), col)
            if row["role_leak"]:
                body += _wrap("⚠ ran on into a new " + ("user turn" if row["user_turn"] else "turn"), col)
            bodies.append(body)
        for a, b in zip(*(body + [""] * (max(map(len, bodies)) - len(body)) for body in bodies)):
            print(f"{_pad(a, col)} │ {b}")


def print_summary(results, runs: dict[str, Run], base: bb.BaseInfo, spec: Spec, clock) -> tuple[int, int]:
    legacy, ours = results["legacy"], results["packlora"]
    n = len(legacy)
    leaked = sum(r["role_leak"] for r in legacy)
    user = sum(r["user_turn"] for r in legacy)
    stopped = sum(r["stop_reason"] == "stop_id" and r["stop_token"] == "<|im_end|>" for r in ours)
    print("\n" + "━" * 40)
    print(f"over {n} held-out prompts (sampled like Qwen2.5-Instruct, seed 0, max_new_tokens {spec.max_new_tokens}):")
    print(f"  legacy, no stop ids: {leaked}/{n} replies ran on into a new turn ({user}/{n} into a user turn); "
          f"{sum(r['emitted_end_of_turn'] for r in legacy)}/{n} ended the answer with <|im_end|> first, but "
          "nothing stopped there")
    print(f"  packlora, stop ids:  {stopped}/{n} replies stopped at <|im_end|>, "
          f"{sum(r['role_leak'] for r in ours)}/{n} wrote a new turn, "
          f"{sum(r['hit_max_new_tokens'] for r in ours)}/{n} hit max_new_tokens")
    base_runtime = _train_runtime(base.path.parent / "stage1.log") if (base.path.parent / "stage1.log").is_file() else None
    parts = [f"base {clock.phases['base'] / 60:.1f} min"
             + (f" ({spec.base.max_steps} steps, {base_runtime / spec.base.max_steps:.2f} s/step)"
                if base_runtime and clock.phases["base"] > 5 else " (cached)")]
    for kind, run in runs.items():
        parts.append(f"{kind} {clock.phases[kind] / 60:.1f} min ({run.steps} steps, {run.train_runtime / run.steps:.2f} s/step)")
    parts.append(f"decoding {clock.phases['decoding'] / 60:.1f} min")
    loads = clock.loads or [clock.start_load["load_1_5_15"][0]]
    print(f"time: {clock.wall / 60:.1f} min ({'; '.join(parts)}); 1-minute load average {min(loads):.1f}-{max(loads):.1f} "
          f"on {clock.start_load['nproc']} CPUs (above the CPU count means other jobs shared them)")
    return leaked, stopped


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
