"""Supervised tokens per second: packlora packed vs padded vs TRL SFTTrainer vs no isolation, per attention.

Same Qwen2-architecture model (random init, seed 0, real 151,936-id Qwen2 tokenizer), same real
shishuo chats, same LoRA (r 16, all projections), 2 DeepSpeed ZeRO-2 processes on CPU, fp32, one
row of up to 1,024 tokens per rank and step. Supervised tokens = labels != -100 after the causal
shift, summed over both ranks; tokens = the real (non-pad) tokens of the batches. The first steps
warm up and are not timed.

Two model shapes:

* ``toy``: hidden 128, 4 layers, intermediate 256. The 151,936-wide vocabulary projection is 97% of
  the matmul FLOPs, so anything that makes an extra pass over the vocabulary looks huge.
* ``layers``: hidden 512, 24 layers, intermediate 2,816 (8 heads, 2 KV heads: Qwen2.5's proportions
  at a CPU-sized width), where the transformer layers do 61% of the matmul FLOPs. With the full
  vocabulary kept, hidden 512 x 8 layers (intermediate 1,408) would still spend 78% of them in the
  vocabulary projection: the layers only dominate once layers x hidden x ~18.75 > 151,936.

Variants:

    packlora_sdpa          packed rows, 1 row / micro-batch, attn_implementation sdpa: isolation by
                           transformers' block-diagonal mask from the restarting positions (the code default),
                           LM head and loss at the supervised positions only, chunked (the code default,
                           model.lm_head_positions: supervised)
    packlora_full_logits   the same with model.lm_head_positions: all (full logits, the path before issue 21)
    packlora_packed_sdpa   the same with attn_implementation packed_sdpa (SDPA per segment, no mask)
    padded_unpacked        8 examples / micro-batch, padded to the longest
    packlora_no_isolation  as packlora_sdpa, positions running on across the row, same labels: what
                           isolation costs
    trl_like_for_like      TRL SFTTrainer: assistant_only_loss on a {% generation %} copy of the same
                           template (the same labels as packlora), BFD packing into rows of 1,024,
                           padding-free, sdpa, activation checkpointing off (packlora runs without it),
                           its fused LM head on, as it ships (on CPU it scores every position: TRL
                           compacts to the supervised positions on Triton devices only)
    trl_defaults           the same with SFTConfig's default activation checkpointing (on)

TRL 1.16 has no setting for its per-step entropy and token-accuracy metrics (its fused LM head always
computes them, over the whole vocabulary), so both TRL variants pay for them: that part of the gap is
TRL's own overhead, not a difference in setup.

Suites (``--suite``), each writing its own table; a run costs ~1.5 minutes of start-up (two
processes importing torch, transformers and DeepSpeed, loading the data) before its steps:

    toy               toy shape: packlora_sdpa, packlora_full_logits, trl_like_for_like; 12 steps (2 warm-up);
                      18 min on 2 shared cores (2026-12-04, load average 3-4)
    toy-trl-defaults  toy shape: packlora_sdpa, trl_defaults, packlora_packed_sdpa
    toy-baselines     toy shape: packlora_sdpa, padded_unpacked, packlora_no_isolation; ~15 min
    layers-trl        layers shape: packlora_sdpa, packlora_full_logits, trl_like_for_like; 3 steps (1 warm-up);
                      18 min (2026-12-04, load average 4)
    layers-attention  layers shape: packlora_sdpa vs packlora_packed_sdpa; 9 min

Every variant runs ``--rounds`` times in alternating order (AB..., ...BA, AB...); each ratio is taken
per round, from the two runs of that round, and reported as the median with min-max. The load
average is recorded before and after every run. The layers suites time 2 steps per run: packlora
and TRL pack different rows, so their supervised-token ratio also carries the rows' share of
supervised tokens; the tokens/s ratio is the compute throughput. packlora_sdpa and
packlora_packed_sdpa train the same rows in the same order.

    bash benchmarks/setup.sh
    benchmarks/.venv/bin/python benchmarks/throughput.py                            # --suite toy
    benchmarks/.venv/bin/python benchmarks/throughput.py --suite toy-baselines
    benchmarks/.venv/bin/python benchmarks/throughput.py --suite layers-trl
    benchmarks/.venv/bin/python benchmarks/throughput.py --suite layers-attention
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

VOCAB = 151_936  # the real Qwen2 tokenizer's size (checked in build_base)
SHAPES = {
    "toy": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2),
    "layers": dict(hidden_size=512, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=8,
                   num_key_value_heads=2),
}
SUITES = {  # name -> (shape, variants, steps, warm-up steps)
    "toy": ("toy", ("packlora_sdpa", "packlora_full_logits", "trl_like_for_like"), 12, 2),
    "toy-trl-defaults": ("toy", ("packlora_sdpa", "trl_defaults", "packlora_packed_sdpa"), 12, 2),
    "toy-baselines": ("toy", ("packlora_sdpa", "padded_unpacked", "packlora_no_isolation"), 12, 2),
    "layers-trl": ("layers", ("packlora_sdpa", "packlora_full_logits", "trl_like_for_like"), 3, 1),
    "layers-attention": ("layers", ("packlora_sdpa", "packlora_packed_sdpa"), 3, 1),
}
ALL_VARIANTS = sorted({v for _, vs, _, _ in SUITES.values() for v in vs})
L = 1024
RATIOS = [  # (label, numerator, denominator, goal)
    ("LM head at supervised positions, chunked / full logits (issue 21)", "packlora_sdpa", "packlora_full_logits",
     "toy: >= 1.8x"),
    ("packlora / TRL, like for like (activation checkpointing off in both)", "packlora_sdpa", "trl_like_for_like",
     "toy: >= 5x, layers: >= 2.0x"),
    ("packlora with full logits / TRL, like for like (before issue 21)", "packlora_full_logits", "trl_like_for_like",
     "(for comparison)"),
    ("packlora / TRL with its defaults (activation checkpointing on)", "packlora_sdpa", "trl_defaults", "(for comparison)"),
    ("packed vs padded", "packlora_sdpa", "padded_unpacked", "ideal"),
    ("isolation cost: isolated (sdpa block mask) / no isolation", "packlora_sdpa", "packlora_no_isolation", ">= 0.9x"),
    ("packed_sdpa / sdpa block mask (the CPU default attention)", "packlora_packed_sdpa", "packlora_sdpa",
     "packed_sdpa stays the bundled default only if > 1 beyond the spread"),
]


def matmul_split(shape: dict) -> tuple[float, float]:
    """Multiply-accumulates per token in the transformer layers' projections and in the vocabulary
    projection (q, k, v, o: h x h, h x kv, h x kv, h x h; MLP: 3 x h x intermediate; head: h x V).
    Attention scores are left out (they grow with the segment length, ~141 tokens on average here)."""
    h, i, n = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return n * (2 * h * h + 2 * h * kv + 3 * h * i), h * VOCAB


def build_base(path: Path, shape: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, set_seed

    tok = AutoTokenizer.from_pretrained(REPO.parent / "shared" / "assets" / "qwen2-tokenizer")
    assert len(tok) == VOCAB, len(tok)
    set_seed(0)
    config = Qwen2Config(vocab_size=len(tok), max_position_embeddings=2048, tie_word_embeddings=True, **shape)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tok.save_pretrained(path)


def run(variant: str, base: Path, work: Path, steps: int, warm: int) -> dict:
    out = work / f"{variant}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = ["deepspeed", "--num_accelerators", "2", "--master_port", str(29600 + ALL_VARIANTS.index(variant)),
           "--no_local_rank", str(REPO / "benchmarks" / "throughput_worker.py"), variant, str(base), str(out), str(steps),
           str(warm), str(L)]
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(out.read_text()) | {"load_before": load, "load_after": os.getloadavg()[0]}


def _spread(xs: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def tables(runs: dict[str, list[dict]]) -> str:
    lines = ["| variant | supervised tokens/s, median (min–max) | per run | tokens/s, median (min–max) | real-token "
             "fraction | load avg during runs |", "|---|---|---|---|---|---|"]
    for v, rs in runs.items():
        tps = [r["supervised_tokens_per_s"] for r in rs]
        loads = [x for r in rs for x in (r["load_before"], r["load_after"])]
        lines.append(f"| {v} | {_spread(tps, '{:.0f}')} | {', '.join(f'{x:.0f}' for x in tps)} | "
                     f"{_spread([r['tokens_per_s'] for r in rs], '{:.0f}')} | {rs[0]['real_token_fraction']:.1%} | "
                     f"{min(loads):.1f}–{max(loads):.1f} |")
    lines += ["", "| ratio (per round) | supervised tokens/s, median (min–max) | tokens/s, median (min–max) | goal |",
              "|---|---|---|---|"]
    for label, a, b, goal in RATIOS:
        if a not in runs or b not in runs:
            continue
        sup = [x["supervised_tokens_per_s"] / y["supervised_tokens_per_s"] for x, y in zip(runs[a], runs[b])]
        tok = [x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(runs[a], runs[b])]
        if goal == "ideal":
            ideal = 1 / statistics.median(r["real_token_fraction"] for r in runs[b])
            goal = f">= 90% of ideal {ideal:.2f}x (1 / padded real-token fraction): {statistics.median(sup) / ideal:.0%}"
        lines.append(f"| {label} | {_spread(sup, '{:.2f}x')} | {_spread(tok, '{:.2f}x')} | {goal} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=list(SUITES), default="toy")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the suite's)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="run every variant this many times, alternating the order (AB, BA, ...) so that a "
                         "machine that speeds up or slows down during the run biases no variant")
    ap.add_argument("--no-write", action="store_true", help="print, do not update RESULTS.md")
    ns = ap.parse_args()
    shape_name, variants, steps, warm = SUITES[ns.suite]
    steps, shape = ns.steps or steps, SHAPES[shape_name]
    started, load0, t0 = time.strftime("%Y-%m-%d %H:%M"), os.getloadavg(), time.perf_counter()
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_base(work / "base", shape)
        for r in range(ns.rounds):
            for v in variants if r % 2 == 0 else variants[::-1]:
                runs[v].append(run(v, work / "base", work, steps, warm))
                x = runs[v][-1]
                print(f"round {r + 1} {v}: {x['supervised_tokens_per_s']:.0f} supervised tokens/s, "
                      f"{x['tokens_per_s']:.0f} tokens/s ({x['real_token_fraction']:.1%} real tokens, load "
                      f"{x['load_before']:.1f} -> {x['load_after']:.1f})", flush=True)
    minutes, load1 = (time.perf_counter() - t0) / 60, os.getloadavg()
    md = tables(runs)
    print(md)
    if ns.no_write:
        return
    layers, head = matmul_split(shape)
    dims = ", ".join(f"{k.replace('num_', '').replace('_size', '')} {v:,}" for k, v in shape.items())
    body = (f"### `--suite {ns.suite}`: shape `{shape_name}` ({dims}, vocabulary {VOCAB:,}; {layers / 1e6:.1f}M "
            f"multiply-accumulates per token in the layers, {head / 1e6:.1f}M in the vocabulary projection: "
            f"{layers / (layers + head):.0%} in the layers)\n\n"
            f"`benchmarks/.venv/bin/python benchmarks/throughput.py --suite {ns.suite} --steps {steps} --rounds "
            f"{ns.rounds}` — {started}, {minutes:.0f} min, {os.cpu_count()} CPU cores shared with other work (load "
            f"average {load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f} at the start, {load1[0]:.1f} / {load1[1]:.1f} / "
            f"{load1[2]:.1f} at the end). {steps - warm} timed steps per run after {warm} warm-up, rows of {L} tokens, "
            f"every variant {ns.rounds}x in alternating order; see the script's docstring for the setup. Absolute "
            "numbers mean little on a shared machine; the per-round ratios are the result.\n\n" + md + "\n")
    write_section(REPO / "benchmarks" / "RESULTS.md", f"throughput-{ns.suite}", body)
    print(f"\nwrote {REPO / 'benchmarks' / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
