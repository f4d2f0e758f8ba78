"""The LM head + cross-entropy alone: full logits (``lm_head_positions: all``) vs supervised positions only.

The demo shape (``configs/shishuo_tiny.yaml``): hidden 128, Qwen2's 151,936-id vocabulary, fp32 on
CPU, one packed row of 1,024 or 4,096 tokens whose labels are those of a real packed row of the
bundled 世说新语 chats (the row with the median supervised fraction among the rows at least 95% full).
The head's weight is frozen, as under LoRA (the demo's tied embedding); the hidden states require
grad. One timed iteration = the head's forward, the loss and its backward to the hidden states.

Variants (``training/lm_head.py``):

    all                  today's path: logits for every position, transformers' ForCausalLMLoss
    supervised_1chunk    only the positions whose next label trains, projected in one chunk (what
                         selecting them with logits_to_keep alone gives)
    supervised           the same in chunks of --chunk positions (default: auto_chunk_tokens, the
                         code's default), each recomputed in the backward

Each run is a fresh process (one thread, like a training rank under OMP_NUM_THREADS=1), so its peak
resident memory is its own: after the setup (weight, hidden states and labels allocated) the
process resets its resident high-water mark (``/proc/self/clear_refs``, Linux) and notes its
resident size; ``peak`` = the high-water mark after the iterations (``VmHWM``) minus that size. Every
variant runs ``--rounds`` times in alternating order; ratios are taken per round and reported as the
median with min-max. Each run also prints its loss and the checksum of the hidden-state gradient;
the script checks that every variant's loss is within 1e-6 and its gradient within 1e-5
(relative) of ``all``'s.

    benchmarks/.venv/bin/python benchmarks/lm_head_bench.py              # rows 1024 and 4096, 5 rounds
    benchmarks/.venv/bin/python benchmarks/lm_head_bench.py --rows 1024 --rounds 3 --no-write
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from packing_bench import write_section  # noqa: E402

SHISHUO = REPO.parent / "shared" / "data" / "shishuo" / "stage2_rewrite.jsonl"
TOKENIZER = REPO.parent / "shared" / "assets" / "qwen2-tokenizer"
HIDDEN, VOCAB = 128, 151_936
VARIANTS = ("all", "supervised_1chunk", "supervised")


def real_labels(length: int, path: Path) -> dict:
    """Labels of a real packed row of ``length`` tokens (saved to ``path``, a .pt file)."""
    import torch
    from transformers import AutoTokenizer

    from packlora.data_utils.chat_format import ChatFormat
    from packlora.data_utils.config import DataConfig
    from packlora.data_utils.dataset import prepare_data
    from packlora.data_utils.collator import PackedCollator

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    with tempfile.TemporaryDirectory() as cache:
        data = prepare_data(DataConfig(train=[str(SHISHUO)], max_seq_length=length, cache_dir=cache), ChatFormat(tok))
        rows = [data.rows[i] for i in range(len(data.rows))]
    full = [r for r in rows if len(r["input_ids"]) >= 0.95 * length]
    batches = [PackedCollator(pad_token_id=0)([r]) for r in full]
    fractions = [float((b["labels"][0, 1:] != -100).float().mean()) for b in batches]
    i = sorted(range(len(full)), key=lambda k: fractions[k])[len(full) // 2]
    labels = torch.full((1, length), -100, dtype=torch.long)
    labels[0, : batches[i]["labels"].shape[1]] = batches[i]["labels"][0]
    torch.save(labels, path)
    return {"row_tokens": len(full[i]["input_ids"]), "supervised": int((labels[0, 1:] != -100).sum()),
            "fraction": fractions[i], "rows": len(rows)}


def worker(variant: str, labels_path: str, chunk: int | None, iters: int) -> dict:
    """One run: setup, ``ru_maxrss`` baseline, 1 warm-up + ``iters`` timed iterations."""
    import torch
    from transformers.loss.loss_utils import ForCausalLMLoss

    from packlora.training.lm_head import auto_chunk_tokens, head_returns_token_ce, supervised_positions

    torch.set_num_threads(1)
    torch.manual_seed(0)
    labels = torch.load(labels_path)
    length = labels.shape[1]
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)
    torch.nn.init.normal_(head.weight, std=0.02)
    head.weight.requires_grad_(False)
    hidden = torch.randn(1, length, HIDDEN, requires_grad=True)
    keep, target = supervised_positions(labels)
    n = int(keep.sum())
    chunk = {"supervised_1chunk": max(n, 1), "supervised": chunk or auto_chunk_tokens(VOCAB)}.get(variant)

    def step():
        hidden.grad = None
        if variant == "all":
            loss = ForCausalLMLoss(head(hidden), labels, VOCAB, num_items_in_batch=torch.tensor(n))
        else:
            with head_returns_token_ce(head, target, chunk):
                loss = head(hidden[keep]).sum() / n
        loss.backward()
        return loss

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size (Linux >= 4.0)
    base = _status_kib("VmRSS")
    step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    peak = _status_kib("VmHWM")
    g = hidden.grad.double()
    return {"variant": variant, "seconds": statistics.median(times), "peak_mb": (peak - base) / 1024,
            "loss": float(loss), "grad_abs_sum": float(g.abs().sum()), "grad_max": float(g.abs().max()),
            "grad_checksum": float((g * torch.linspace(-1, 1, g.numel()).view_as(g).double()).sum()),
            "chunk": chunk, "supervised": n}


def _status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``: resident now; ``VmHWM``: its high-water mark)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def run(variant: str, labels_path: Path, chunk: int | None, iters: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    load = os.getloadavg()[0]
    cmd = [sys.executable, __file__, "--worker", variant, str(labels_path), str(chunk or 0), str(iters)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) | {"load_before": load, "load_after": os.getloadavg()[0]}


def _spread(xs, fmt: str) -> str:
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def table(length: int, info: dict, runs: dict[str, list[dict]]) -> str:
    ref = runs["all"][0]
    lines = [f"Row of {length:,} tokens: a real packed row of {info['row_tokens']:,} tokens, {info['supervised']:,} "
             f"supervised positions ({info['fraction']:.1%}).", "",
             "| variant | chunk (positions) | time per iteration, ms | peak memory over baseline, MB | time vs all | "
             "peak memory vs all | loss rel. diff vs all | grad rel. diff vs all | load avg during runs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for v, rs in runs.items():
        t_ratio = [a["seconds"] / r["seconds"] for a, r in zip(runs["all"], rs)]
        m_ratio = [a["peak_mb"] / max(r["peak_mb"], 1e-9) for a, r in zip(runs["all"], rs)]
        loss_d = max(abs(r["loss"] - ref["loss"]) / abs(ref["loss"]) for r in rs)
        grad_d = max(max(abs(r[k] - ref[k]) / abs(ref[k]) for k in ("grad_abs_sum", "grad_max", "grad_checksum"))
                     for r in rs)
        loads = [x for r in rs for x in (r["load_before"], r["load_after"])]
        chunk = "—" if v == "all" else f"{rs[0]['chunk']:,}"
        lines.append(f"| {v} | {chunk} | {_spread([r['seconds'] * 1e3 for r in rs], '{:.0f}')} | "
                     f"{_spread([r['peak_mb'] for r in rs], '{:,.0f}')} | {_spread(t_ratio, '{:.2f}x')} | "
                     f"{_spread(m_ratio, '{:.1f}x')} | {loss_d:.1e} | {grad_d:.1e} | {min(loads):.1f}–{max(loads):.1f} |")
    return "\n".join(lines)


def check_exact(runs: dict[str, list[dict]]) -> None:
    ref = runs["all"][0]
    for v, rs in runs.items():
        for r in rs:
            if abs(r["loss"] - ref["loss"]) > 1e-6 * abs(ref["loss"]):
                raise SystemExit(f"{v}: loss {r['loss']} differs from all's {ref['loss']} by more than 1e-6")
            for k in ("grad_abs_sum", "grad_max", "grad_checksum"):
                if abs(r[k] - ref[k]) > 1e-5 * abs(ref[k]):
                    raise SystemExit(f"{v}: gradient {k} {r[k]} differs from all's {ref[k]} by more than 1e-5")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1024, 4096], help="row lengths in tokens")
    ap.add_argument("--rounds", type=int, default=5, help="runs per variant, alternating the order")
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per run (after 1 warm-up)")
    ap.add_argument("--chunk", type=int, default=None, help="positions per chunk (default: the code's auto)")
    ap.add_argument("--no-write", action="store_true", help="print, do not update RESULTS.md")
    ns = ap.parse_args()
    started, load0, t0 = time.strftime("%Y-%m-%d %H:%M"), os.getloadavg(), time.perf_counter()
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        for length in ns.rows:
            labels_path = Path(tmp) / f"labels{length}.pt"
            info = real_labels(length, labels_path)
            runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
            for r in range(ns.rounds):
                for v in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
                    x = run(v, labels_path, ns.chunk, ns.iters)
                    runs[v].append(x)
                    print(f"L={length} round {r + 1} {v}: {x['seconds'] * 1e3:.0f} ms, peak +{x['peak_mb']:.0f} MB, "
                          f"loss {x['loss']:.6f} (load {x['load_before']:.1f} -> {x['load_after']:.1f})", flush=True)
            check_exact(runs)
            sections.append(table(length, info, runs))
    minutes, load1 = (time.perf_counter() - t0) / 60, os.getloadavg()
    md = "\n\n".join(sections)
    print(md)
    if ns.no_write:
        return
    cmd = "benchmarks/.venv/bin/python benchmarks/lm_head_bench.py" + (
        f" --rows {' '.join(map(str, ns.rows))}" if ns.rows != [1024, 4096] else "") + (
        f" --rounds {ns.rounds}" if ns.rounds != 5 else "") + (f" --iters {ns.iters}" if ns.iters != 5 else "") + (
        f" --chunk {ns.chunk}" if ns.chunk else "")
    body = ("## LM head + cross-entropy alone: full logits vs supervised positions, chunked\n\n"
            f"`{cmd}` — {started}, {minutes:.0f} min, {os.cpu_count()} CPU cores shared with other work (load "
            f"average {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f} at the start, {load1[0]:.1f} / {load1[1]:.1f} / "
            f"{load1[2]:.1f} at the end). Demo shape: hidden {HIDDEN}, vocabulary {VOCAB:,}, fp32, frozen head weight, "
            f"one thread per run; forward + loss + backward to the hidden states, median of {ns.iters} iterations "
            f"after 1 warm-up; every variant {ns.rounds}x in alternating order, each run a fresh process; ratios "
            "per round, median (min–max). Peak memory: the run's resident high-water mark over its baseline "
            "(see the script's docstring).\n\n" + md + "\n")
    write_section(REPO / "benchmarks" / "RESULTS.md", "lm-head", body)
    print(f"\nwrote {REPO / 'benchmarks' / 'RESULTS.md'}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, variant, labels_path, chunk, iters = sys.argv
        print(json.dumps(worker(variant, labels_path, int(chunk) or None, int(iters))))
    else:
        main()
