"""A second run's data preparation: seconds and peak RSS of ``prepare_data`` when the data is already
prepared (issue 22: "under 2 s of its start, on the 100k corpus"), against the cold run that prepared it.

The corpus is ``data_prep_bench.make_chats`` (``--chats`` unique chats made from the real ones), the
tokenizer the real Qwen2 one, ``max_seq_length`` 2048, packlora's defaults otherwise. Each run is a
fresh process; the time is ``prepare_data`` alone (imports and the tokenizer load excluded), peak RSS
is the process's ``ru_maxrss`` (the main process only: the cold run's ``num_proc`` tokenising
workers are not counted). Runs, in order:

* ``cold``: a fresh cache: read, tokenise, pack, write the cache (once; minutes at 100k);
* ``warm``: the same data and settings: the cache key from the remembered file digests, the rows
  loaded (``--rounds`` times);
* ``warm, digests forgotten``: ``cache_dir/digests`` deleted first, so the corpus is hashed again
  (``--rounds`` times, alternating with ``warm``).

    python benchmarks/prepare_once_bench.py                    # 100k chats: ~5 min on 2 shared cores; updates RESULTS.md
    python benchmarks/prepare_once_bench.py --chats 5000 --no-write   # a quick look
    python benchmarks/prepare_once_bench.py --profile 20000           # cProfile of one cold run, num_proc 1: ~1 min
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
RESULTS = REPO / "benchmarks" / "RESULTS.md"
MARK = ("<!-- prepare-once -->", "<!-- /prepare-once -->")


def worker(corpus: Path, cache: Path) -> dict:
    """One ``prepare_data`` call in this process: seconds, rows, this process's peak RSS (MB)."""
    import logging

    from transformers import AutoTokenizer

    from data_prep_bench import TOKENIZER
    from packlora.data_utils.chat_format import ChatFormat
    from packlora.data_utils.config import DataConfig
    from packlora.data_utils.dataset import prepare_data

    logging.basicConfig(level=logging.WARNING)
    import datasets

    datasets.disable_progress_bars()
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = DataConfig(train=[str(corpus)], max_seq_length=2048, cache_dir=str(cache))
    t0 = time.perf_counter()
    data = prepare_data(cfg, ChatFormat(tok))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "rows": len(data.rows), "records": data.report.records,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def profile(chats: int) -> None:
    """Print the top items of a cProfile of one cold ``prepare_data`` over ``chats`` chats, ``num_proc: 1``
    (the tokenising runs in this process, so the profile sees it)."""
    import cProfile
    import io
    import pstats

    import datasets
    from transformers import AutoTokenizer

    from data_prep_bench import TOKENIZER, make_chats
    from packlora.data_utils.chat_format import ChatFormat
    from packlora.data_utils.config import DataConfig
    from packlora.data_utils.dataset import prepare_data

    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory(prefix="prepare-profile-") as tmp:
        corpus = make_chats(chats, Path(tmp) / "chats.jsonl")
        fmt = ChatFormat(AutoTokenizer.from_pretrained(TOKENIZER))
        cfg = DataConfig(train=[str(corpus)], max_seq_length=2048, cache_dir=str(Path(tmp) / "cache"), num_proc=1)
        prof = cProfile.Profile()
        prof.runcall(prepare_data, cfg, fmt)
    for order, n in (("tottime", 18), ("cumulative", 30)):
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats(order).print_stats(n)
        print(out.getvalue())


def _run(corpus: Path, cache: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", str(corpus), str(cache)], capture_output=True,
                         text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["load"] = os.getloadavg()[0]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chats", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md as it is")
    ap.add_argument("--profile", type=int, metavar="CHATS", help="print a cProfile of one cold run instead")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.profile:
        profile(args.profile)
        return
    if args.worker:
        print(json.dumps(worker(Path(args.worker[0]), Path(args.worker[1]))))
        return
    from data_prep_bench import make_chats

    started, load0 = time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="prepare-once-") as tmp:
        corpus = make_chats(args.chats, Path(tmp) / "chats.jsonl")
        size_mb = corpus.stat().st_size / 1e6
        cache = Path(tmp) / "cache"
        cold = _run(corpus, cache)
        warm, forgot = [], []
        for r in range(args.rounds):
            for kind in (("warm", "forgot") if r % 2 == 0 else ("forgot", "warm")):
                if kind == "forgot":
                    shutil.rmtree(cache / "digests", ignore_errors=True)
                (warm if kind == "warm" else forgot).append(_run(corpus, cache))
    load1 = os.getloadavg()

    def cell(runs, key, fmt):
        xs = [r[key] for r in runs]
        return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"

    lines = [
        MARK[0], "## A second run's data preparation (prepared once per job)", "",
        f"`python benchmarks/prepare_once_bench.py --chats {args.chats} --rounds {args.rounds}` — {started}, "
        f"{os.cpu_count()} CPU cores shared with other work (load average {load0[0]:.1f} / {load0[1]:.1f} / "
        f"{load0[2]:.1f} at the start, {load1[0]:.1f} / {load1[1]:.1f} / {load1[2]:.1f} at the end). "
        f"{args.chats:,} unique chats ({size_mb:.0f} MB of JSONL), Qwen2 tokenizer, rows of 2048 tokens, "
        "defaults otherwise; each run a fresh process, the time `prepare_data` alone.", "",
        "| run | runs | seconds, median (min–max) | peak RSS MB of the main process (workers not counted), median (min–max) | rows | load avg during runs |",
        "|---|---|---|---|---|---|",
        f"| cold (fresh cache: read, tokenise, pack, write) | 1 | {cold['seconds']:.1f} | {cold['peak_rss_mb']:.0f} | "
        f"{cold['rows']:,} | {cold['load']:.1f} |",
    ]
    for name, runs in (("warm (same data and settings)", warm), ("warm, file digests forgotten (corpus hashed)", forgot)):
        lines.append(f"| {name} | {len(runs)} | {cell(runs, 'seconds', '{:.2f}')} | {cell(runs, 'peak_rss_mb', '{:.0f}')} "
                     f"| {runs[0]['rows']:,} | {min(r['load'] for r in runs):.1f}–{max(r['load'] for r in runs):.1f} |")
    lines += ["", f"Cold: {args.chats / cold['seconds']:.0f} chats/s (one run, not alternated with TRL: see the data "
              "preparation table for the comparison). Goal (issue 22): a second run spends under 2 s of its start in "
              "data preparation, on the 100k corpus.", MARK[1]]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        text = RESULTS.read_text(encoding="utf-8")
        if MARK[0] in text:
            head, rest = text.split(MARK[0], 1)
            text = head + table + rest.split(MARK[1], 1)[1]
        else:
            text = text.rstrip("\n") + "\n\n" + table + "\n"
        RESULTS.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
