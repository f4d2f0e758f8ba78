"""Time and memory of ``prepare_data`` on pathological input, and of chat labelling by number of turns.

    .venv/bin/python benchmarks/hostile_inputs.py            # all cases, 3 rounds; writes RESULTS.md's section
    .venv/bin/python benchmarks/hostile_inputs.py --rounds 1 --no-write --cases turns_5000

Each pathological case is a JSONL file of three ordinary chats plus the odd record (``CASES``),
read by ``prepare_data`` with the real Qwen2 tokenizer, ``on_error: skip``, ``max_seq_length``
2048 and the default ``num_proc``. Every run happens in a child forked from a process that has
already imported everything and prepared a small file once, so the figures are what the odd record
adds: wall time, and peak resident memory above the child's resident memory at the start (Linux
``VmHWM`` after resetting it through ``/proc/self/clear_refs``, minus ``VmRSS``). Building the file is
not timed. The target is at most 5 s and 200 MB per case on 2 cores (issue 25).

The labelling table times ``ChatFormat.encode_chat`` on a chat of N short turns (``question i?`` /
``answer i.``) with the linear split (the default, ``_split_linear``) and with the per-prefix
rendering it replaces (``_split_by_prefixes``), alternating in each round, and checks that both give
the same ids and labels. Nothing here is a test; ``tests/data_utils/test_hostile_inputs.py`` checks the
outcomes and the mechanisms.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared" / "assets" / "qwen2-tokenizer"
RESULTS = REPO / "benchmarks" / "RESULTS.md"
MAX_SEQ_LENGTH = 2048


def _chat(user: str, assistant: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _turns(n: int) -> dict:
    msgs = []
    for i in range(n):
        msgs += [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]
    return {"messages": msgs}


def _write(path: Path, odd: bytes) -> None:
    with open(path, "wb") as f:
        for i in range(3):
            f.write(json.dumps(_chat(f"Ordinary question {i}?", f"Ordinary answer {i}.")).encode() + b"\n")
        f.write(odd)


# name -> (what it is, the odd bytes after three ordinary chats, the expected report: lines_read, records,
# examples, dropped)
CASES = {
    "line_50mb": ("one 50 MB line: a chat whose user message is 50,000,000 ASCII characters",
                  lambda: json.dumps(_chat("x" * 50_000_000, "ok")).encode() + b"\n",
                  (4, 4, 3, {"too_long": 1})),
    "line_50mb_invalid": ("one 50 MB line that is not JSON (a string never closed)",
                          lambda: b'{"messages": "' + b"x" * 50_000_000 + b"\n",
                          (4, 3, 3, {"invalid_json": 1})),
    "turns_5000": ("a chat of 5,000 short turns (10,000 messages)",
                   lambda: json.dumps(_turns(5000)).encode() + b"\n",
                   (4, 4, 3, {"too_long": 1})),
    "nested_100k": ("JSON nested 100,000 levels deep",
                    lambda: b"[" * 100_000 + b"]" * 100_000 + b"\n",
                    (4, 3, 3, {"nested_too_deep": 1})),
    "message_10m": ("one assistant message of 10,000,000 characters",
                    lambda: json.dumps(_chat("hi", "y" * 10_000_000)).encode() + b"\n",
                    (4, 4, 3, {"too_long": 1})),
    "empty_lines_1m": ("1,000,000 empty lines",
                       lambda: b"\n" * 1_000_000,
                       (1_000_003, 3, 3, {"blank_line": 1_000_000})),
    "text_10m_drop": ("a {\"text\"} record of 10,000,000 characters under overflow: drop",
                      lambda: json.dumps({"text": "z" * 10_000_000}).encode() + b"\n",
                      (4, 4, 3, {"too_long": 1})),
}
OVERRIDES = {"text_10m_drop": {"overflow": "drop"}}


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_in_child(fn, timeout: float = 600.0):
    """``fn()`` in a forked child: ``(result, seconds, peak MB above the child's start)``; the child
    is killed after ``timeout`` seconds (then ``TimeoutError``). ``fn`` returns something picklable."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)

    def run():
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident size
        start = _kib("VmRSS")
        t = time.perf_counter()
        try:
            out = ("ok", fn())
        except BaseException as e:  # noqa: BLE001  (reported to the parent, which decides)
            out = ("error", f"{type(e).__name__}: {e}"[:2000])
        seconds = time.perf_counter() - t
        child.send((out, seconds, (_kib("VmHWM") - start) / 1024))
        child.close()

    proc = ctx.Process(target=run)
    proc.start()
    child.close()
    if not parent.poll(timeout):
        proc.kill()
        proc.join()
        raise TimeoutError(f"no result after {timeout:.0f} s")
    out, seconds, mb = parent.recv()
    proc.join()
    return out, seconds, mb


def prepare(path: Path, fmt, cache: Path, **data) -> tuple:
    """``prepare_data`` of ``path`` under ``on_error: skip``: (lines_read, records, examples, dropped)."""
    from packlora.data_utils.config import DataConfig
    from packlora.data_utils.dataset import prepare_data

    cfg = DataConfig(train=[str(path)], on_error="skip", max_seq_length=MAX_SEQ_LENGTH, cache_dir=str(cache), **data)
    r = prepare_data(cfg, fmt).report
    return r.lines_read, r.records, r.examples, r.dropped


def warm_format():
    """The real Qwen2 ``ChatFormat``, with every import and first-use cost paid (one small run)."""
    import logging

    from transformers import AutoTokenizer

    from packlora.data_utils.chat_format import ChatFormat

    logging.disable(logging.WARNING)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import datasets

    datasets.disable_progress_bars()
    fmt = ChatFormat(AutoTokenizer.from_pretrained(TOKENIZER))
    with tempfile.TemporaryDirectory() as d:
        _write(Path(d) / "warm.jsonl", b"")
        prepare(Path(d) / "warm.jsonl", fmt, Path(d) / "cache")
    return fmt


def run_cases(names, rounds: int, fmt) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for name in names:
            what, build, expected = CASES[name]
            path = Path(d) / f"{name}.jsonl"
            _write(path, build())
            times, mbs, outcome = [], [], None
            for r in range(rounds):
                out, seconds, mb = measure_in_child(
                    lambda: prepare(path, fmt, Path(d) / f"cache-{name}-{r}", **OVERRIDES.get(name, {})))
                outcome = out[1] if out[0] == "error" else out[1]
                times.append(seconds)
                mbs.append(mb)
            ok = outcome == expected
            rows.append(dict(name=name, what=what, times=times, mbs=mbs, outcome=outcome, ok=ok))
            print(f"{name}: {statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f}), "
                  f"peak +{max(mbs):.0f} MB, {outcome}{'' if ok else f'  EXPECTED {expected}'}", flush=True)
            path.unlink()
    return rows


def run_turns(counts, rounds: int, fmt) -> list[dict]:
    """encode_chat time per turn count, linear vs per-prefix rendering, alternating; same result checked."""
    rows = []
    for n in counts:
        msgs = _turns(n)["messages"]
        lin, pre, same = [], [], True
        for r in range(rounds):
            order = ("linear", "prefixes") if r % 2 == 0 else ("prefixes", "linear")
            results = {}
            for how in order:
                if how == "prefixes" and n > 800:
                    continue  # 5,000 turns by prefixes takes minutes (it is what the linear split replaces)
                saved = fmt._split_linear
                if how == "prefixes":
                    fmt._split_linear = lambda *a, **k: None
                t = time.perf_counter()
                try:
                    chat = fmt.encode_chat(msgs)
                finally:
                    fmt._split_linear = saved
                (lin if how == "linear" else pre).append(time.perf_counter() - t)
                results[how] = [(s.input_ids, s.labels) for s in chat.examples]
            if len(results) == 2:
                same &= results["linear"] == results["prefixes"]
        rows.append(dict(turns=n, linear=lin, prefixes=pre, same=same))
        print(f"{n} turns: linear {statistics.median(lin):.3f} s"
              + (f", prefixes {statistics.median(pre):.3f} s, same ids and labels: {same}" if pre else ""), flush=True)
    return rows


def _fmt_spread(values, unit="s", digits=2) -> str:
    return (f"{statistics.median(values):.{digits}f} {unit} ({min(values):.{digits}f}–{max(values):.{digits}f})"
            if len(values) > 1 else f"{values[0]:.{digits}f} {unit}")


def write_results(cases, turns, rounds: int, started: str, minutes: float, loads) -> None:
    import platform

    import tokenizers
    import transformers

    lines = ["<!-- hostile-inputs -->",
             "## Pathological input: time and memory of `prepare_data`, and chat labelling by turns",
             "",
             f"`.venv/bin/python benchmarks/hostile_inputs.py --rounds {rounds}` — {started}, {minutes:.1f} min, "
             f"{os.cpu_count()} CPU cores shared with other work (load average {loads[0]} at the start, {loads[1]} at "
             f"the end); Python {platform.python_version()}, transformers {transformers.__version__}, tokenizers "
             f"{tokenizers.__version__}. Three ordinary chats plus the odd record, real Qwen2 tokenizer, "
             f"`on_error: skip`, `max_seq_length` {MAX_SEQ_LENGTH}; each run in a child forked from a warm process, "
             "so the figures are what the odd record adds (the script's docstring). Target: at most 5 s and 200 MB.",
             "",
             "| case | time, median (min–max) | peak memory above start, max | report (lines_read, records, examples, dropped) |",
             "|---|---|---|---|"]
    for c in cases:
        lines.append(f"| {c['what']} | {_fmt_spread(c['times'])} | {max(c['mbs']):.0f} MB | "
                     f"{c['outcome']}{'' if c['ok'] else ' (NOT the expected outcome)'} |")
    lines += ["", "`ChatFormat.encode_chat` on a chat of N short turns (real Qwen2 tokenizer), the linear split "
              "(default) and the per-prefix rendering it replaces, alternating per round:", "",
              "| turns | linear split | per-prefix rendering | same ids and labels |", "|---|---|---|---|"]
    for t in turns:
        lines.append(f"| {t['turns']:,} | {_fmt_spread(t['linear'], digits=3)} | "
                     f"{_fmt_spread(t['prefixes'], digits=3) if t['prefixes'] else 'not run (minutes)'} | "
                     f"{'yes' if t['prefixes'] and t['same'] else 'NO' if t['prefixes'] else '–'} |")
    lines += ["", "<!-- /hostile-inputs -->"]
    section = "\n".join(lines) + "\n"
    text = RESULTS.read_text()
    if "<!-- hostile-inputs -->" in text:
        head, rest = text.split("<!-- hostile-inputs -->", 1)
        text = head + section + rest.split("<!-- /hostile-inputs -->\n", 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)
    print(f"wrote {RESULTS}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--turns", nargs="*", type=int, default=[50, 200, 800, 5000])
    p.add_argument("--no-write", action="store_true", help="print only; leave benchmarks/RESULTS.md alone")
    args = p.parse_args(argv)
    started = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load0 = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    t0 = time.time()
    fmt = warm_format()
    cases = run_cases(args.cases, args.rounds, fmt)
    turns = run_turns(args.turns, args.rounds, fmt)
    load1 = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    if not args.no_write:
        write_results(cases, turns, args.rounds, started, (time.time() - t0) / 60, (load0, load1))
    return 0 if all(c["ok"] for c in cases) and all(t["same"] for t in turns) else 1


if __name__ == "__main__":
    sys.exit(main())
