"""Supervised tokens per second: packlora packed vs padded vs TRL SFTTrainer vs no isolation.

Same tiny Qwen2 (hidden 128, 4 layers, real 151,936-id Qwen2 tokenizer, random init, seed 0),
same real shishuo chats, same LoRA (r 16, all projections), 2 DeepSpeed ZeRO-2 processes on CPU,
fp32. Supervised tokens = labels != -100 after the causal shift, summed over both ranks; steps
1-2 are warm-up and not timed.

    (a) packlora_packed        rows of 1024 tokens, 1 row / micro-batch, attn_implementation packed_sdpa
                               (SDPA per segment, no mask)
    (b) padded_unpacked        8 examples / micro-batch, padded to the longest
    (c) trl_sft_packing        TRL SFTTrainer, packing_strategy="bfd", max_length 1024, completion-only loss
    (d) packlora_no_isolation  as (a) with sdpa, positions running on across the row, same labels as (a):
                               what isolation costs
    (a2) packlora_packed_sdpa_mask  as (a) with plain sdpa: isolation by transformers' block-diagonal mask

    bash benchmarks/setup.sh
    benchmarks/.venv/bin/python benchmarks/throughput.py [--steps 12]    # prints, updates RESULTS.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from packing_bench import write_section  # noqa: E402

VARIANTS = ("packlora_packed", "padded_unpacked", "trl_sft_packing", "packlora_no_isolation", "packlora_packed_sdpa_mask")
MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=True)


def build_base(path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, set_seed

    tok = AutoTokenizer.from_pretrained(REPO.parent / "shared" / "assets" / "qwen2-tokenizer")
    set_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=len(tok), **MODEL), dtype=torch.float32)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def run(variant: str, base: Path, work: Path, steps: int) -> dict:
    out = work / f"{variant}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    cmd = ["deepspeed", "--num_accelerators", "2", "--master_port", str(29600 + VARIANTS.index(variant)),
           "--no_local_rank", str(REPO / "benchmarks" / "throughput_worker.py"), variant, str(base), str(out), str(steps)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2,
                    help="run every variant this many times, alternating the order (ABCD, DCBA, ...) so that a "
                         "machine that speeds up or slows down during the run biases no variant; medians are reported")
    ns = ap.parse_args()
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_base(work / "base")
        for r in range(ns.rounds):
            for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                runs[v].append(run(v, work / "base", work, ns.steps))
                print(f"round {r + 1} {v}: {runs[v][-1]['supervised_tokens_per_s']:.0f} supervised tokens/s "
                      f"({runs[v][-1]['real_token_fraction']:.1%} real tokens)", flush=True)
    results = {v: min(rs, key=lambda x: abs(x["supervised_tokens_per_s"] - statistics.median(
        [y["supervised_tokens_per_s"] for y in rs]))) | {"supervised_tokens_per_s": statistics.median(
        [y["supervised_tokens_per_s"] for y in rs])} for v, rs in runs.items()}
    a = results["packlora_packed"]["supervised_tokens_per_s"]
    b = results["padded_unpacked"]
    ideal = 1 / b["real_token_fraction"]
    lines = ["| variant | supervised tokens/s | real-token fraction of the batch |", "|---|---|---|"]
    lines += [f"| {v} | {r['supervised_tokens_per_s']:.0f} | {r['real_token_fraction']:.1%} |" for v, r in results.items()]
    ratios = [
        "| ratio | measured | goal |", "|---|---|---|",
        f"| (a)/(b) packed vs padded | {a / b['supervised_tokens_per_s']:.2f}x | >= 90% of ideal {ideal:.2f}x "
        f"(= 1 / padded real-token fraction {b['real_token_fraction']:.1%}): {a / b['supervised_tokens_per_s'] / ideal:.0%} |",
        f"| (a)/(c) packlora vs TRL SFTTrainer | {a / results['trl_sft_packing']['supervised_tokens_per_s']:.2f}x | >= 1.0x |",
        f"| (a)/(d) isolation cost | {a / results['packlora_no_isolation']['supervised_tokens_per_s']:.2f}x | >= 0.9x |",
        f"| (a2)/(d) isolation cost with sdpa's L x L mask | "
        f"{results['packlora_packed_sdpa_mask']['supervised_tokens_per_s'] / results['packlora_no_isolation']['supervised_tokens_per_s']:.2f}x | (for comparison) |",
    ]
    md = "\n".join(lines) + "\n\n" + "\n".join(ratios)
    print(md)
    body = ("## Training throughput (2 DeepSpeed ZeRO-2 processes on CPU, fp32)\n\n"
            f"`benchmarks/.venv/bin/python benchmarks/throughput.py --steps {ns.steps} --rounds {ns.rounds}` — one "
            f"invocation, every variant run {ns.rounds}x in alternating order, medians; see the script's docstring for "
            "the setup. Absolute numbers mean little on a shared machine; the ratios are the result.\n\n"
            "Per-run figures (supervised tokens/s): "
            + "; ".join(f"{v} " + ", ".join(f"{x['supervised_tokens_per_s']:.0f}" for x in rs) for v, rs in runs.items())
            + "\n\n"
            + md + "\n")
    write_section(REPO / "benchmarks" / "RESULTS.md", "throughput", body)


if __name__ == "__main__":
    main()
