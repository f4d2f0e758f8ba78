"""Cold data preparation, chats/s: packlora's ``prepare_data`` vs TRL's ``SFTTrainer`` dataset preparation.

Both do the same work on the same chats: read the JSONL files, render every chat with the Qwen2
tokenizer's own template, tokenise it, build assistant-only labels (each reply and its closing
``<|im_end|>`` trained, everything else -100) and pack the examples into rows of
``max_seq_length`` tokens.

* **packlora**: ``prepare_data`` with a fresh cache directory (so nothing is loaded from an earlier
  run), ``data.num_proc`` 1 and 2 (2 is its default on this machine). Besides the work above it
  also drops duplicate records, audits the labels of every row and writes the tokenised and packed
  datasets to its cache (``save_to_disk``), all inside the timed span.
* **TRL** (1.16): ``SFTConfig(assistant_only_loss=True, packing=True, packing_strategy="bfd")``,
  with its default ``dataset_num_proc`` (None: one process) and with 2. TRL needs
  ``{% generation %}`` tags in the template to find the assistant spans; the Qwen2 template has
  none and TRL ships no training copy of it, so ``GENERATION_TEMPLATE`` below is the same template
  with the tags around each reply and its ``<|im_end|>``. The timed span is reading the files into
  a ``datasets.Dataset`` (``load_dataset("json")``: Arrow, a fresh cache) plus
  ``SFTTrainer._prepare_dataset`` (TRL's whole preparation: render + tokenise with the assistant
  mask, labels, BFD packing), which ``SFTTrainer.__init__`` calls; the
  trainer itself (a tiny model) is built before the clock starts, with ``skip_prepare_dataset``.

Before the timed rounds, a check (not timed) runs TRL's tokenisation without packing and
packlora's ``ChatFormat.encode_chat`` on every chat of the set and counts the chats whose
``input_ids`` and labels are identical; the table reports it, so the two are shown to do the same
work.

Each run is a fresh process (no tokenizer cache, no warm ``datasets`` cache); the time excludes
imports and loading the tokenizer. Peak memory is over all of a run's processes: the sum of the
proportional set sizes (PSS: resident memory, a page shared by n processes counted 1/n in each, so
the forked ``num_proc`` workers' copy-on-write pages are not counted twice as a sum of RSS would)
of the run's process and its children, read from ``/proc/PID/smaps_rollup`` every 50 ms, its
highest value (imports, torch and the tokenizer included: compare growth, not the level). Two
figures: all of it, and the anonymous part (``Pss_Anon``: the heap, what the process owns). The
difference is file pages: the memory-mapped Arrow files both libraries read, resident while
touched and given back by the kernel under pressure (page cache), so they grow with the corpus
without being memory the process holds. Every variant runs ``--rounds`` times in alternating order
(ABCD, DCBA, ...); each packlora/TRL ratio is taken per round (the two runs closest in time) and
reported as the median with min-max. The load average (``os.getloadavg``) is recorded before and
after every run: the machine is shared.

Sets: the real shishuo (3,434) and zhanghenshui (3,146) chats, both files as read by each side, with
all four variants; and ``--chats N`` (default 100,000) chats made from them: the real chats in order,
repeated, every repetition ``k >= 1`` with `` #k`` appended to its last user message so that no two
are equal (packlora drops duplicates), in one JSONL file, with the two defaults (TRL's one process,
packlora's num_proc 2; a run takes 2-3 minutes, so the others are left out to keep the command short).

    bash benchmarks/setup.sh
    benchmarks/.venv/bin/python benchmarks/data_prep_bench.py              # ~30 min on 2 shared cores; updates RESULTS.md
    benchmarks/.venv/bin/python benchmarks/data_prep_bench.py --chats 0    # the real chats only: ~8 min
    benchmarks/.venv/bin/python benchmarks/data_prep_bench.py --rounds 1 --variants trl,packlora_np2 \\
        --chats 100000,1000000     # + growth from 100k to 1M chats: ~75 min on 2 cores
    benchmarks/.venv/bin/python benchmarks/data_prep_bench.py --rounds 1 --chats 20000 --no-write   # a quick look

``--scale 20000,80000`` instead measures how packlora's default (num_proc 2) grows with the corpus:
one run per size (sizes in alternating order over ``--rounds``), seconds per 1,000 chats and peak
RSS, and the growth from the smallest size to each larger one (section ``data-prep-scale``). With
``--baseline DIR`` (a checkout of another packlora commit, e.g. ``git worktree add DIR COMMIT``),
each run is repeated with that commit's code, alternating, so a change lands with before/after
figures from one run. packlora only: any environment with packlora and psutil will do.

    python benchmarks/data_prep_bench.py --scale 20000,80000 --rounds 1 --baseline ../packlora-before
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
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "benchmarks"))

TOKENIZER = SHARED / "assets" / "qwen2-tokenizer"
REAL = [SHARED / "data" / "shishuo" / "stage2_rewrite.jsonl", SHARED / "data" / "zhanghenshui" / "stage2_continue.jsonl"]
VARIANTS = {  # name -> (library, processes); None = the library's default
    "trl": ("trl", None),
    "trl_np2": ("trl", 2),
    "packlora_np1": ("packlora", 1),
    "packlora_np2": ("packlora", 2),
}
PAIRS = [  # (label, packlora variant, TRL variant)
    ("packlora default (num_proc 2) / TRL default (1 process)", "packlora_np2", "trl"),
    ("packlora / TRL, 1 process each", "packlora_np1", "trl"),
    ("packlora / TRL, 2 processes each", "packlora_np2", "trl_np2"),
]

# The Qwen2 tokenizer's chat template (../shared/assets/qwen2-tokenizer/chat_template.jinja), with
# {% generation %} around each assistant reply and its <|im_end|>: the span packlora trains. The
# rendering is unchanged (checked in ``check_same_work``).
GENERATION_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_chats(n: int, out: Path) -> Path:
    """Write ``n`` unique chats made from the real ones (see the module docstring) to ``out``."""
    real = [json.loads(line)["messages"] for f in REAL for line in f.read_text(encoding="utf-8").splitlines()]
    with out.open("w", encoding="utf-8") as f:
        for i in range(n):
            k, msgs = divmod(i, len(real))[0], [dict(m) for m in real[i % len(real)]]
            if k:
                last_user = max(j for j, m in enumerate(msgs) if m["role"] == "user")
                msgs[last_user]["content"] += f" #{k}"
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return out


def read_chats(files: list[Path]) -> list[list[dict]]:
    return [json.loads(line)["messages"] for f in files for line in f.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------- workers


def _quiet() -> None:
    import logging

    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    logging.disable(logging.WARNING)
    import transformers

    transformers.logging.set_verbosity_error()


def _trl_trainer(tok, max_seq_length: int, num_proc: int | None, packing: bool = True):
    """An SFTTrainer (tiny model, preparation skipped) whose ``_prepare_dataset`` is what SFTTrainer runs."""
    import datasets
    from transformers import AutoModelForCausalLM, Qwen2Config
    from trl import SFTConfig, SFTTrainer

    tok.chat_template = GENERATION_TEMPLATE
    model = AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2,
                                                         num_key_value_heads=1))
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="trl-"), max_length=max_seq_length if packing else None,
                     packing=packing, packing_strategy="bfd", assistant_only_loss=True, dataset_num_proc=num_proc,
                     report_to=[], bf16=False, use_cpu=True, dataset_kwargs={"skip_prepare_dataset": True})
    dummy = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    return SFTTrainer(model=model, args=args, train_dataset=dummy, processing_class=tok), args


def _cpu() -> float:
    """CPU seconds of this process, its threads and its finished children (datasets' num_proc workers)."""
    import resource

    return sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime
               for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def use_source(root: Path) -> None:
    """Import ``packlora`` (and ``packlora.<folder>``, as setup.cfg maps them) from the checkout ``root``
    instead of the installed one: the ``--baseline`` runs."""
    import importlib.util

    class Finder:
        @staticmethod
        def find_spec(name, path=None, target=None):
            parts = name.split(".")
            if parts[0] != "packlora" or len(parts) > 2:
                return None
            folder = root / ("packlora" if len(parts) == 1 else parts[1])
            init = folder / "__init__.py"
            if not folder.is_dir():
                return None
            return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(folder)])

    sys.meta_path.insert(0, Finder)


def worker(variant: str, files: list[Path], max_seq_length: int) -> dict:
    if os.environ.get("PACKLORA_BASELINE"):
        use_source(Path(os.environ["PACKLORA_BASELINE"]))
    _quiet()
    import pyarrow.compute as pc
    from transformers import AutoTokenizer

    lib, num_proc = VARIANTS[variant]
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    if lib == "trl":
        import datasets

        trainer, args = _trl_trainer(tok, max_seq_length, num_proc)
        load, cpu0 = os.getloadavg()[0], _cpu()
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as cache:  # datasets' JSON reader into Arrow, a cold cache
            # one file at a time: the real files' other columns differ (datasets would refuse to cast one to the other)
            ds = datasets.concatenate_datasets([
                datasets.load_dataset("json", data_files=str(f), split="train", cache_dir=cache).select_columns("messages")
                for f in files])
            rows = trainer._prepare_dataset(ds, tok, args, True, None, "train")
            labels_col = rows.data.column("labels")
        seconds, cpu = time.perf_counter() - t0, _cpu() - cpu0
        chats, labels = len(ds), labels_col
    else:
        from packlora.data_utils.chat_format import ChatFormat
        from packlora.data_utils.config import DataConfig
        from packlora.data_utils.dataset import prepare_data

        with tempfile.TemporaryDirectory() as cache:
            cfg = DataConfig(train=[str(f) for f in files], max_seq_length=max_seq_length, cache_dir=cache,
                             num_proc=num_proc)
            load, cpu0 = os.getloadavg()[0], _cpu()
            t0 = time.perf_counter()
            data = prepare_data(cfg, ChatFormat(tok))
            seconds, cpu = time.perf_counter() - t0, _cpu() - cpu0
            chats, rows, labels = data.report.records, data.rows, data.rows.data.column("labels")
            if data.report.dropped:
                raise SystemExit(f"packlora dropped {data.report.dropped}: the sets must be complete at this length")
            # read before the cache directory goes away
            labelled = int(pc.sum(pc.not_equal(pc.list_flatten(labels), -100)).as_py())
            return dict(variant=variant, chats=chats, seconds=seconds, chats_per_s=chats / seconds, rows=len(rows),
                        labelled_tokens=labelled, cpu_s=cpu, load_before=load, load_after=os.getloadavg()[0])
    labelled = int(pc.sum(pc.not_equal(pc.list_flatten(labels), -100)).as_py())
    return dict(variant=variant, chats=chats, seconds=seconds, chats_per_s=chats / seconds, rows=len(rows),
                labelled_tokens=labelled, cpu_s=cpu, load_before=load, load_after=os.getloadavg()[0])


def check_same_work(files: list[Path]) -> dict:
    """Per chat: TRL's unpacked ``input_ids``/labels vs packlora's ``encode_chat`` (not timed)."""
    _quiet()
    import datasets
    from transformers import AutoTokenizer

    from packlora.data_utils.chat_format import ChatFormat

    chats = read_chats(files)
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    fmt = ChatFormat(AutoTokenizer.from_pretrained(TOKENIZER))
    same_render = sum(tok.apply_chat_template(c, tokenize=False) ==
                      tok.apply_chat_template(c, tokenize=False, chat_template=GENERATION_TEMPLATE) for c in chats)
    trainer, args = _trl_trainer(tok, 0, None, packing=False)
    trl = trainer._prepare_dataset(datasets.Dataset.from_list([{"messages": c} for c in chats]), tok, args, False,
                                   None, "train")
    same_ids = same_labels = 0
    for c, ids, labels in zip(chats, trl["input_ids"], trl["labels"]):
        [seg] = fmt.encode_chat(c).examples
        same_ids += list(seg.input_ids) == list(ids)
        same_labels += list(seg.input_ids) == list(ids) and list(seg.labels) == list(labels)
    return dict(chats=len(chats), trl_examples=len(trl), same_rendering=same_render, same_ids=same_ids,
                same_labels=same_labels)


# ---------------------------------------------------------------------------------------- driver


def _spawn(args: list[str], baseline: Path | None = None) -> dict:
    """Run this script with ``args`` in a fresh process (packlora from ``baseline`` when given); its
    last stdout line (JSON), plus ``peak_rss_mb`` and ``peak_anon_mb``: the highest sums of PSS and of
    its anonymous part over the process and its children, sampled every 50 ms."""
    import psutil

    def pss(pid: int) -> tuple[int, int]:
        """(Pss, Pss_Anon) of ``pid`` in bytes."""
        with open(f"/proc/{pid}/smaps_rollup") as f:
            fields = dict(line.split(":", 1) for line in f if line[:4] == "Pss:" or line.startswith("Pss_Anon:"))
        return int(fields["Pss"].split()[0]) * 1024, int(fields["Pss_Anon"].split()[0]) * 1024

    env = {**os.environ, "PACKLORA_BASELINE": str(baseline.resolve())} if baseline else None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, *args], stdout=out, stderr=err, text=True, env=env)
        peak = peak_anon = 0
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                sizes = [pss(p.pid) for p in (ps, *ps.children(recursive=True))]
                peak = max(peak, sum(t for t, _ in sizes))
                peak_anon = max(peak_anon, sum(a for _, a in sizes))
            except (psutil.Error, OSError, KeyError):  # a worker ended between listing and reading it
                pass
            time.sleep(0.05)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed:\n{(stdout + stderr)[-4000:]}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_rss_mb": peak / 2**20, "peak_anon_mb": peak_anon / 2**20}


def run_set(name: str, files: list[Path], variants: list[str], rounds: int, max_seq_length: int) -> dict:
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants if r % 2 == 0 else variants[::-1]:
            res = _spawn(["--worker", v, "--max-seq-length", str(max_seq_length), *map(str, files)])
            runs[v].append(res)
            print(f"{name} round {r + 1} {v}: {res['chats_per_s']:.0f} chats/s ({res['seconds']:.1f} s, {res['rows']} rows, "
                  f"peak PSS {res['peak_rss_mb']:.0f} MB, load {res['load_before']:.1f} -> {res['load_after']:.1f})",
                  flush=True)
    return runs


def _spread(xs: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(statistics.median(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def tables(sets: list[tuple[str, dict, dict | None]]) -> str:
    out = ["| set | chats | variant | chats/s, median (min–max) | peak memory MB (PSS, all processes; anonymous), max | rows | "
           "labelled tokens | load avg during runs |", "|---|---|---|---|---|---|---|---|"]
    for name, runs, _ in sets:
        for v, rs in runs.items():
            loads = [x for r in rs for x in (r["load_before"], r["load_after"])]
            out.append(f"| {name} | {rs[0]['chats']:,} | {v} | {_spread([r['chats_per_s'] for r in rs])} | "
                       f"{max(r['peak_rss_mb'] for r in rs):.0f} ({max(r['peak_anon_mb'] for r in rs):.0f}) | {rs[0]['rows']:,} | {rs[0]['labelled_tokens']:,} | "
                       f"{min(loads):.1f}–{max(loads):.1f} |")
    out += ["", "| set | ratio (per round: the two runs closest in time) | median (min–max) | goal |", "|---|---|---|---|"]
    for name, runs, _ in sets:
        for label, a, b in PAIRS:
            if a in runs and b in runs:
                ratios = [x["chats_per_s"] / y["chats_per_s"] for x, y in zip(runs[a], runs[b])]
                out.append(f"| {name} | {label} | {_spread(ratios, '{:.2f}x')} | >= 1.5x |")
    checks = [(name, c) for name, _, c in sets if c]
    if checks:
        out.append("")
        for name, c in checks:
            out.append(f"Same work ({name}, not timed): {c['same_rendering']:,} of {c['chats']:,} chats render "
                       f"identically with the {{% generation %}} copy of the template; TRL's unpacked examples and "
                       f"packlora's `encode_chat` have identical `input_ids` for {c['same_ids']:,} and identical "
                       f"`input_ids` and labels for {c['same_labels']:,} of {c['chats']:,} chats.")
    return "\n".join(out)


def growth(sets: list[tuple[str, dict, dict | None]]) -> str:
    """How each variant's time per chat and peak memory grow from the first made-up set to the others."""
    (name0, runs0, _), out = sets[0], []
    out += [f"| variant | set | time per chat vs {name0} (median) | peak memory MB (PSS, all processes), max | "
            f"vs {name0} | of it anonymous MB | vs {name0} |", "|---|---|---|---|---|---|---|"]
    for v in runs0:
        t0 = statistics.median(r["seconds"] / r["chats"] for r in runs0[v])
        m0, a0 = max(r["peak_rss_mb"] for r in runs0[v]), max(r["peak_anon_mb"] for r in runs0[v])
        for name, runs, _ in sets:
            if v in runs:
                t = statistics.median(r["seconds"] / r["chats"] for r in runs[v])
                m, a = max(r["peak_rss_mb"] for r in runs[v]), max(r["peak_anon_mb"] for r in runs[v])
                out.append(f"| {v} | {name} | {t / t0:.2f}x | {m:.0f} | {m / m0:.2f}x | {a:.0f} | {a / a0:.2f}x |")
    return "\n".join(out)


def scale(sizes: list[int], rounds: int, max_seq_length: int, baseline: Path | None = None,
          variant: str = "packlora_np2") -> str:
    """Run ``variant`` on made-up sets of each size (sizes alternating per round; with ``baseline``,
    each run followed or preceded by the same run on that checkout's code); the markdown table."""
    codes = ["this commit", "baseline"] if baseline else ["this commit"]
    runs: dict[tuple[str, int], list[dict]] = {(c, n): [] for c in codes for n in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        files = {n: make_chats(n, Path(tmp) / f"chats-{n}.jsonl") for n in sizes}
        for r in range(rounds):
            order = [(c, n) for n in sizes for c in codes]
            for c, n in order if r % 2 == 0 else order[::-1]:
                res = _spawn(["--worker", variant, "--max-seq-length", str(max_seq_length), str(files[n])],
                             baseline if c == "baseline" else None)
                runs[c, n].append(res)
                print(f"scale {c} {n:,} round {r + 1}: {res['seconds']:.1f} s, {1000 * res['seconds'] / n:.2f} s per "
                      f"1k chats, peak PSS {res['peak_rss_mb']:.0f} MB (anonymous {res['peak_anon_mb']:.0f} MB), load {res['load_before']:.1f} -> "
                      f"{res['load_after']:.1f}", flush=True)
    base = sizes[0]
    med = {k: (statistics.median(1000 * r["seconds"] / k[1] for r in rs), max(r["peak_rss_mb"] for r in rs),
               max(r["peak_anon_mb"] for r in rs)) for k, rs in runs.items()}
    out = [f"| code | chats | runs | s per 1,000 chats, median | time per chat vs {base:,} | peak memory MB (PSS, all "
           f"processes), max | vs {base:,} | of it anonymous (heap) MB | vs {base:,} | load avg during runs |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for (c, n), rs in runs.items():
        loads = [x for r in rs for x in (r["load_before"], r["load_after"])]
        t, m, a = med[c, n]
        t0, m0, a0 = med[c, base]
        out.append(f"| {c} | {n:,} | {len(rs)} | {t:.2f} | {t / t0:.2f}x | {m:.0f} | {m - m0:+.0f} MB | {a:.0f} | "
                   f"{a - a0:+.0f} MB | {min(loads):.1f}–{max(loads):.1f} |")
    if baseline:  # per round, the two runs of a size are next to each other in time
        out += ["", "| chats | baseline time / this commit's time, per round | median (min–max) |", "|---|---|---|"]
        for n in sizes:
            ratios = [b["seconds"] / a["seconds"] for a, b in zip(runs["this commit", n], runs["baseline", n])]
            out.append(f"| {n:,} | {', '.join(f'{r:.2f}x' for r in ratios)} | {_spread(ratios, '{:.2f}x')} |")
    return "\n".join(out)


def _commit(root: Path) -> str:
    return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chats", default="100000",
                    help="sizes of the made-up sets, comma-separated, e.g. 100000,1000000 (0: leave them out); with "
                         "two or more, a table of how time per chat and peak memory grow from the first")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="variants on the real chats")
    ap.add_argument("--big-variants", default="trl,packlora_np2",
                    help="variants on the --chats set (each run takes 2-3 minutes): the two defaults")
    ap.add_argument("--max-seq-length", type=int, default=2048, help="row length (every real chat fits in 2,048)")
    ap.add_argument("--scale", default="", help="comma-separated sizes: measure growth with the corpus instead")
    ap.add_argument("--baseline", type=Path, help="with --scale: a checkout of another commit, run alternately")
    ap.add_argument("--section", default="data-prep-scale", help="with --scale: the RESULTS.md section to write")
    ap.add_argument("--title", default="Data preparation as the corpus grows: time per chat and peak memory "
                    "(packlora default)", help="with --scale: the section's heading")
    ap.add_argument("--no-write", action="store_true", help="print, do not update RESULTS.md")
    ns = ap.parse_args()
    started, load0 = time.strftime("%Y-%m-%d %H:%M"), os.getloadavg()
    t0 = time.perf_counter()
    if ns.scale:
        sizes = [int(x) for x in ns.scale.split(",")]
        md = scale(sizes, ns.rounds, ns.max_seq_length, ns.baseline)
        print(md)
        if not ns.no_write:
            from packing_bench import write_section

            minutes, load1 = (time.perf_counter() - t0) / 60, os.getloadavg()
            body = (f"## {ns.title}\n\n"
                    f"`python benchmarks/data_prep_bench.py --scale {ns.scale} --rounds {ns.rounds}"
                    + (f" --section {ns.section}" if ns.section != "data-prep-scale" else "")
                    + (f" --baseline {ns.baseline.name}` (baseline: commit {_commit(ns.baseline)}) " if ns.baseline else "` ")
                    + f"(this commit: {_commit(REPO)}) "
                    f"— {started}, {minutes:.0f} min, {os.cpu_count()} CPU cores shared with other work (load average "
                    f"{load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f} at the start, {load1[0]:.1f} / {load1[1]:.1f} / "
                    f"{load1[2]:.1f} at the end). `prepare_data` with `num_proc` 2 (the default here) on made-up sets "
                    "of unique chats (the script's docstring), rows of "
                    f"{ns.max_seq_length} tokens, a fresh process and cache per run. Peak memory: the highest sum of PSS "
                    "(resident memory, shared pages split between the processes sharing them) over the run's process "
                    "and its tokenising workers, sampled every 50 ms. Goals (issue 22): peak RSS "
                    "grows by at most 150 MB from 20k to 80k chats; from 100k to 1M chats time per chat within 15% "
                    "and peak RSS at most 2.5 GB.\n\n" + md + "\n")
            write_section(REPO / "benchmarks" / "RESULTS.md", ns.section, body)
            print(f"\nwrote {REPO / 'benchmarks' / 'RESULTS.md'}")
        return
    check = _spawn(["--check", *map(str, REAL)])
    print("same work:", check, flush=True)
    sets = [("real chats", run_set("real", REAL, ns.variants.split(","), ns.rounds, ns.max_seq_length), check)]
    sizes = [int(x) for x in ns.chats.split(",") if int(x)]
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            big = make_chats(n, Path(tmp) / f"chats-{n}.jsonl")
            name = f"{n // 1000}k chats" if n % 1000 == 0 else f"{n:,} chats"
            sets.append((name, run_set(name, [big], ns.big_variants.split(","), ns.rounds, ns.max_seq_length), None))
            big.unlink()
    minutes, load1 = (time.perf_counter() - t0) / 60, os.getloadavg()
    md = tables(sets)
    if len(sizes) > 1:
        md += "\n\n" + growth(sets[1:])
    print(md)
    if ns.no_write:
        return
    import datasets
    import tokenizers
    import trl

    from packing_bench import write_section

    body = (
        "## Data preparation: chats/s, packlora `prepare_data` vs TRL `SFTTrainer` (same chats, same work)\n\n"
        f"`benchmarks/.venv/bin/python benchmarks/data_prep_bench.py --rounds {ns.rounds} --chats {ns.chats}` — "
        f"{started}, {minutes:.0f} min, {os.cpu_count()} CPU cores shared with other work (load average "
        f"{load0[0]:.1f} / {load0[1]:.1f} / {load0[2]:.1f} at the start, {load1[0]:.1f} / {load1[1]:.1f} / "
        f"{load1[2]:.1f} at the end); trl {trl.__version__}, datasets {datasets.__version__}, tokenizers "
        f"{tokenizers.__version__}. Cold: read + tokenise + assistant-only labels + pack, rows of "
        f"{ns.max_seq_length} tokens, a fresh process and cache per run; TRL with `assistant_only_loss=True` on "
        "a `{% generation %}` copy of the same template and BFD packing. Each variant ran "
        f"{ns.rounds}x in alternating order; see the script's docstring for what is timed. Labelled tokens: "
        "labels != -100 in the packed rows (before the loss masks the first label of each packlora segment).\n\n"
        + md + "\n"
    )
    write_section(REPO / "benchmarks" / "RESULTS.md", "data-prep", body)
    print(f"\nwrote {REPO / 'benchmarks' / 'RESULTS.md'}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        a = argparse.ArgumentParser()
        a.add_argument("--worker")
        a.add_argument("--max-seq-length", type=int)
        a.add_argument("files", nargs="+", type=Path)
        w = a.parse_args()
        print(json.dumps(worker(w.worker, w.files, w.max_seq_length)))
    elif len(sys.argv) > 1 and sys.argv[1] == "--check":
        print(json.dumps(check_same_work([Path(f) for f in sys.argv[2:]])))
    else:
        main()
