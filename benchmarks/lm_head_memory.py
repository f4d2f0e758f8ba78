"""Bytes per logit element that one chunk of the supervised LM head holds at its peak, the figures
``training/memory.py CHUNK_BYTES_PER_LOGIT`` uses for the start-up memory estimate.

For each dtype (float32, bfloat16) and head (frozen, as under LoRA; trainable, as with a LoRA on
``lm_head`` or full fine-tuning): a fresh one-thread process runs one forward and backward pass of
``training.lm_head.head_returns_token_ce`` on ``2 C`` positions in chunks of ``C`` (hidden 128,
151,936 ids), after a warm-up pass, from a reset resident high-water mark (``/proc/self/clear_refs``,
Linux); the peak over the start is measured at ``C`` = 64 and 192, and the slope between them,
divided by ``(192 - 64) x 151,936``, is the bytes per element (what does not grow with the chunk,
such as a trainable head's weight gradient, drops out). The allocator's reuse of freed blocks moves
a figure by about one byte between runs, so every case runs ``--rounds`` times (alternating the
chunk order) and the table gives the median and the maximum; the estimate takes the maximum.

    .venv/bin/python benchmarks/lm_head_memory.py --rounds 3     # ~3 min on 2 cores
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

HIDDEN, VOCAB = 128, 151_936
CHUNKS = (64, 192)


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def worker(dtype: str, trainable: bool, chunk: int) -> int:
    """Peak resident bytes over the start of one pass (after a warm-up pass)."""
    import torch

    from packlora.training.lm_head import head_returns_token_ce

    torch.set_num_threads(1)
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).to(dt).requires_grad_(trainable)
    hidden = torch.randn(2 * chunk, HIDDEN, dtype=dt, requires_grad=True)
    target = torch.randint(0, VOCAB, (2 * chunk,))

    def step():
        hidden.grad = None
        head.zero_grad(set_to_none=True)
        with head_returns_token_ce(head, target, chunk):
            head(hidden).sum().backward()

    step()
    head.zero_grad(set_to_none=True)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    base = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - base) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="runs per case and chunk size")
    ns = ap.parse_args()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print(f"load average at the start: {os.getloadavg()[0]:.1f}")
    print("| dtype | head | bytes per element, median | max | per round |")
    print("|---|---|---|---|---|")
    for dtype in ("float32", "bfloat16"):
        for trainable in (False, True):
            slopes = []
            for r in range(ns.rounds):
                peaks = {}
                for chunk in CHUNKS if r % 2 == 0 else CHUNKS[::-1]:
                    cmd = [sys.executable, __file__, "--worker", dtype, str(int(trainable)), str(chunk)]
                    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
                    peaks[chunk] = int(proc.stdout.split()[-1])
                slopes.append((peaks[CHUNKS[1]] - peaks[CHUNKS[0]]) / ((CHUNKS[1] - CHUNKS[0]) * VOCAB))
            print(f"| {dtype} | {'trainable' if trainable else 'frozen'} | {statistics.median(slopes):.2f} | "
                  f"{max(slopes):.2f} | {', '.join(f'{x:.2f}' for x in slopes)} |", flush=True)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        print(worker(sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])))
    else:
        main()
