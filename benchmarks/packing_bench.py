"""Packing quality and speed: packlora's whole-set BFD vs TRL's ``pack_dataset(strategy="bfd")``.

Both pack identical length sets. TRL packs a ``datasets.Dataset`` of token lists (its only API),
so its time includes building the packed Arrow column; packlora is timed twice: the row
assignment alone, and assignment + the same Arrow gather (``pyarrow.compute.take``), which is
the like-for-like figure. The lower bound is ``ceil(sum(lengths) / L)`` rows.

    bash benchmarks/setup.sh                       # once: benchmarks/.venv with packlora + TRL
    benchmarks/.venv/bin/python benchmarks/packing_bench.py   # prints the table, updates RESULTS.md
"""
from __future__ import annotations

import argparse
import math
import statistics
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def chat_lengths(path: Path, max_seq_length: int) -> list[int]:
    """Token lengths (real Qwen2 tokenizer, packlora's chat rendering) of every chat in ``path``."""
    from datasets.utils.logging import disable_progress_bar
    from transformers import AutoTokenizer

    from packlora.data_utils.chat_format import ChatFormat
    from packlora.data_utils.config import DataConfig
    from packlora.data_utils.dataset import prepare_data

    disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(SHARED / "assets" / "qwen2-tokenizer")
    data = prepare_data(DataConfig(train=[str(path)], max_seq_length=max_seq_length), ChatFormat(tok))
    if data.report.dropped:
        raise SystemExit(f"{path}: {data.report.dropped} dropped at L={max_seq_length}; the sets must be complete")
    return [n for lens in data.rows["seq_lens"] for n in lens]


def lognormal_lengths(n: int, seed: int = 0) -> list[int]:
    """lognormal(mu=5.5, sigma=0.8), rounded, clipped to [8, 4096]."""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(5.5, 0.8, n)), 8, 4096).astype(np.int64).tolist()


def token_column(lengths: list[int]) -> pa.ListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.zeros(offsets[-1], dtype=np.int32)))


def arrow_gather(column: pa.LargeListArray, rows: list[list[int]]) -> pa.LargeListArray:
    """Packed rows as one Arrow list column: each row the concatenation of its items' tokens.
    One ``numpy.concatenate`` of zero-copy slices of the token buffer (a list-level
    ``pyarrow.compute.take`` is ~50x slower)."""
    order = np.fromiter((i for r in rows for i in r), dtype=np.int64)
    offsets = column.offsets.to_numpy()
    values = column.values.to_numpy(zero_copy_only=True)
    starts, ends = offsets[:-1][order], offsets[1:][order]
    tokens = np.concatenate([values[s:e] for s, e in zip(starts.tolist(), ends.tolist())])
    row_len = np.fromiter((len(r) for r in rows), dtype=np.int64)
    row_ends = np.cumsum(ends - starts)[np.cumsum(row_len) - 1]
    return pa.LargeListArray.from_arrays(pa.array(np.concatenate([[0], row_ends])), pa.array(tokens))


def _median_time(fn, repeats: int):
    """(median seconds, last result) of ``repeats`` calls. The first call of a big set pays the
    kernel's first-touch page faults for its output (seconds for 1.4 GB), so one call alone
    measures the allocator more than the packer; both packers get the same treatment."""
    times, result = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def run_set(name: str, lengths: list[int], L: int, repeats: int) -> dict:
    import datasets
    from trl.data_utils import pack_dataset

    from packlora.data_utils.packing import best_fit_decreasing

    total = sum(lengths)
    column = token_column(lengths)
    t_assign, rows = _median_time(lambda: best_fit_decreasing(lengths, L), repeats)
    t_ours, packed = _median_time(lambda: arrow_gather(column, best_fit_decreasing(lengths, L)), repeats)
    assert len(packed) == len(rows) and pc.sum(pc.list_value_length(packed)).as_py() == total
    del packed
    ds = datasets.Dataset(pa.table({"input_ids": column.cast(pa.list_(pa.int32()))}))
    t_trl, trl_packed = _median_time(lambda: pack_dataset(ds, L, strategy="bfd"), repeats)
    return dict(name=name, L=L, n=len(lengths), lower=math.ceil(total / L), rows=len(rows),
                eff=total / (len(rows) * L), t_assign=t_assign, t_ours=t_ours,
                t_trl=t_trl, trl_rows=len(trl_packed), trl_eff=total / (len(trl_packed) * L))


def table(results: list[dict]) -> str:
    lines = [
        "| length set | L | items | lower bound | TRL rows | TRL eff. | packlora rows | packlora eff. | vs lower bound "
        "| TRL time | packlora assign | packlora assign+gather | speed-up, packing | speed-up, packing + gather |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        trl = r.get("trl_rows")
        lines.append(
            f"| {r['name']} | {r['L']} | {r['n']:,} | {r['lower']:,} | {trl:,} | {100 * r['trl_eff']:.2f}% "
            f"| {r['rows']:,} | {100 * r['eff']:.2f}% | +{100 * (r['rows'] / r['lower'] - 1):.2f}% "
            f"| {r['t_trl']:.2f} s | {r['t_assign']:.2f} s | {r['t_ours']:.2f} s | {r['t_trl'] / r['t_assign']:.0f}x "
            f"| {r['t_trl'] / r['t_ours']:.1f}x |"
        )
    return "\n".join(lines)


def write_section(path: Path, marker: str, body: str) -> None:
    """Replace the block between ``<!-- marker -->`` and ``<!-- /marker -->`` in ``path``."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-1m", action="store_true", help="leave out the 1M-length set (about 3 GB of Arrow data)")
    ap.add_argument("--repeats", type=int, default=3, help="time each packer this many times; medians are reported")
    ns = ap.parse_args()
    sets = [
        ("shishuo chats", chat_lengths(SHARED / "data/shishuo/stage2_rewrite.jsonl", 1024), 1024),
        ("zhanghenshui continuation chats", chat_lengths(SHARED / "data/zhanghenshui/stage2_continue.jsonl", 2048), 2048),
        ("lognormal(5.5, 0.8) in [8, 4096], 100k, seed 0", lognormal_lengths(100_000), 4096),
    ]
    if not ns.skip_1m:
        sets.append(("same, 1M", lognormal_lengths(1_000_000), 4096))
    results = []
    for name, lengths, L in sets:
        r = run_set(name, lengths, L, ns.repeats)
        print(f"{name}: packlora {r['rows']} rows in {r['t_ours']:.2f}s, TRL {r['trl_rows']} rows in {r['t_trl']:.2f}s",
              flush=True)
        results.append(r)
    md = table(results)
    print(md)
    import torch
    import trl

    body = (
        "## Packing: rows and speed vs TRL `pack_dataset(strategy=\"bfd\")`\n\n"
        f"`benchmarks/.venv/bin/python benchmarks/packing_bench.py` — one run, median of {ns.repeats} calls per "
        f"packer and set, {os.cpu_count()} CPU cores, "
        f"trl {trl.__version__}, torch {torch.__version__}. Identical length sets for both; TRL's time includes "
        "building its packed Arrow column, so two packlora figures are given: the packing itself (row assignment "
        "from the lengths, what packlora's data pipeline computes) and packing + materialising the same Arrow "
        "column of tokens (like for like). The materialising copy is memory-bound: for 1M rows it writes 1.4 GB "
        "into fresh pages, so it dominates. Lower bound = ceil(total tokens / L).\n\n" + md + "\n"
    )
    write_section(REPO / "benchmarks" / "RESULTS.md", "packing", body)
    print(f"\nwrote {REPO / 'benchmarks' / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
