"""``packlora subset``: a reproducible, length-stratified correction subset of a JSONL file.

    packlora subset --input ../shared/data/zhanghenshui/stage2_continue.jsonl \\
        --output runs/zhanghenshui/correction_subset.jsonl --ratio 0.2 --seed 1 \\
        --tokenizer ../shared/assets/qwen2-tokenizer

How records are drawn (``--stratify length``, the default):

1. Each record gets a length: tokens of its text (``--tokenizer DIR``: the message contents, or
   the ``text``, tokenised without special tokens and summed), or characters without a tokenizer.
2. Records are grouped by their number of assistant turns (0 for ``{"text"}``), so multi-turn
   chats are never under-drawn: each group gets ``ratio`` of its records, rounded by largest
   remainder so the total is ``round(ratio * N)``.
3. Inside a group, records are ranked by length and cut into ``--bins`` equal-count length bins
   (deciles by default); each bin gets its share the same way. The subset's length quantiles
   therefore track the source's.
4. Each bin is drawn with ``random.Random(seed)`` in a fixed order; the chosen lines are written
   byte for byte, in source order. Same input, ratio, seed and tokenizer -> byte-identical output.

``--stratify none`` draws ``round(ratio * N)`` records uniformly instead. A manifest goes next to
the output (``OUT.manifest.json`` for ``OUT.jsonl``): source path and sha256, ratio, seed, length
unit, counts (total and by turns) and length quantiles before and after.

The input streams: a first pass keeps two integers a record (length, assistant turns), a second
pass copies the chosen lines; no pass holds every line or record, so a corpus of millions of chats
is drawn in a few MB.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
from collections import Counter
from pathlib import Path

from packlora.core.cli import add_debug_flag, cli_entry, description
from packlora.core.errors import InputError, MissingPathError, PathError
from packlora.data_utils.records import DataFileError, RecordError, data_file_error, iter_lines, parse_line
from packlora.data_utils.types import ChatRecord

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
STRATIFY = ("length", "none")


def largest_remainder(sizes: list[int], total: int) -> list[int]:
    """Split ``total`` over groups in proportion to ``sizes``, each share at most its size.

    Floors first, then one more to the groups with the largest remainders (ties: earlier group).

    >>> largest_remainder([10, 5, 5], 4)
    [2, 1, 1]
    >>> largest_remainder([3, 3, 3], 2)
    [1, 1, 0]
    """
    n = sum(sizes)
    if n == 0:
        return [0] * len(sizes)
    exact = [s * total / n for s in sizes]
    shares = [int(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def quantiles(values: list[int]) -> dict[str, float]:
    """Nearest-rank quantiles (``p10`` ... ``p99``) plus ``min``, ``max`` and ``mean``.

    >>> quantiles(list(range(1, 101)))["p50"], quantiles([7])["p99"]
    (50, 7)
    """
    if not values:
        return {}
    s = sorted(values)
    out: dict[str, float] = {"min": s[0]}
    for q in QUANTILES:
        out[f"p{round(q * 100)}"] = s[max(0, math.ceil(round(q * len(s), 9)) - 1)]
    out["max"] = s[-1]
    out["mean"] = round(sum(s) / len(s), 3)
    return out


def draw_subset(lengths: list[int], turns: list[int], ratio: float, seed: int,
                stratify: str = "length", bins: int = 10) -> list[int]:
    """Indices of the records to keep, sorted (see the module docstring for the scheme).

    Ten records, eight single-turn and two two-turn; half of them, two length bins per group:
    the single-turn group gives 4 (2 of its 4 shortest, 2 of its 4 longest), the two-turn group 1.

    >>> lengths, turns = [5, 1, 9, 3, 7, 2, 8, 4, 6, 10], [1] * 8 + [2] * 2
    >>> keep = draw_subset(lengths, turns, 0.5, seed=0, bins=2)
    >>> len(keep), sum(turns[i] == 2 for i in keep), sorted(lengths[i] <= 4 for i in keep if turns[i] == 1)
    (5, 1, [False, False, True, True])
    """
    n = len(lengths)
    k = round(ratio * n)
    rng = random.Random(seed)
    if stratify == "none":
        return sorted(rng.sample(range(n), k))
    groups: dict[int, list[int]] = {}
    for i, t in enumerate(turns):
        groups.setdefault(t, []).append(i)
    keys = sorted(groups)
    chosen: list[int] = []
    for key, share in zip(keys, largest_remainder([len(groups[t]) for t in keys], k)):
        ranked = sorted(groups[key], key=lambda i: (lengths[i], i))
        nb = max(1, min(bins, len(ranked)))
        cuts = [len(ranked) * b // nb for b in range(nb + 1)]
        cells = [ranked[cuts[b] : cuts[b + 1]] for b in range(nb)]
        for cell, take in zip(cells, largest_remainder([len(c) for c in cells], share)):
            chosen += rng.sample(cell, take)
    return sorted(chosen)


SCAN_BATCH = 1000  # records tokenised per tokenizer call (the ids of a text do not depend on its batch)


def record_lengths(records, tokenizer=None) -> list[int]:
    """Length of each record: tokens of its contents with ``tokenizer``, else characters."""
    texts = [
        [m.content for m in r.messages] if isinstance(r, ChatRecord) else [r.text] for r in records
    ]
    if tokenizer is None:
        return [sum(len(t) for t in ts) for ts in texts]
    flat = [t for ts in texts for t in ts]
    ids = tokenizer(flat, add_special_tokens=False)["input_ids"]
    out, k = [], 0
    for ts in texts:
        out.append(sum(len(x) for x in ids[k : k + len(ts)]))
        k += len(ts)
    return out


def make_subset(input_path: str | Path, output_path: str | Path, ratio: float, seed: int,
                stratify: str = "length", tokenizer_dir: str | None = None, bins: int = 10) -> dict:
    """Write the subset of ``input_path`` to ``output_path`` and its manifest; return the manifest.

    Lines are read as training data is (``records.iter_lines``: split at ``\\n`` only, a byte-order
    mark at the start dropped), every one must be a valid record, and the chosen ones are written
    byte for byte (line 1 without its byte-order mark), each ending with ``\\n``.

    Raises:
        DataFileError: the input cannot be read (missing, a directory, a FIFO, unreadable,
            compressed) or changed while it was read.
        RecordError: a malformed line (``path:line:`` first); the first one stops the subset.
        InputError: ``ratio`` not in (0, 1], an empty input or subset, ``output_path`` equal to
            ``input_path``, a bad ``stratify``/``bins``, or a tokenizer that cannot be loaded.
        PathError: ``output_path`` is a directory or cannot be written (MissingPathError: no tokenizer
            directory).
    """
    problems = []
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        problems.append(f"--ratio must be in (0, 1], e.g. 0.2 for a 20% subset; got {ratio!r}")
    if stratify not in STRATIFY:
        problems.append(f"--stratify must be one of {list(STRATIFY)}, got {stratify!r}")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        problems.append(f"--bins must be an integer >= 1, got {bins!r}")
    if problems:
        raise InputError("; ".join(problems))
    input_path, output_path = Path(input_path), Path(output_path)
    problem = data_file_error(input_path, "--input file")
    if problem is not None:
        raise problem
    if output_path.resolve() == input_path.resolve():
        raise InputError(f"--output {output_path} is the input file; write the subset somewhere else")
    if output_path.is_dir():
        raise PathError(f"--output {output_path} is a directory; give the path of the .jsonl file to write")
    tokenizer = None
    if tokenizer_dir is not None:
        if not Path(tokenizer_dir).is_dir():
            raise MissingPathError(f"--tokenizer {tokenizer_dir} is not a directory")
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        except (OSError, ValueError) as e:
            raise InputError(f"--tokenizer {tokenizer_dir} cannot be loaded as a tokenizer ({e})") from None
    before = input_path.stat()
    lengths, turns = _scan(input_path, tokenizer)
    if not lengths:
        raise InputError(f"--input {input_path} holds no records; give a JSONL file of chats or {{'text'}} records")
    if round(ratio * len(lengths)) < 1:
        raise InputError(
            f"--ratio {ratio} of {len(lengths)} records rounds to 0; raise the ratio to at least {0.5 / len(lengths):.4g}"
        )
    chosen = draw_subset(lengths, turns, ratio, seed, stratify, bins)
    digest = _copy_lines(input_path, output_path, chosen, before)
    manifest = {
        "source": str(input_path),
        "source_sha256": _sha256(input_path),
        "output": str(output_path),
        "output_sha256": digest,
        "ratio": ratio,
        "seed": seed,
        "stratify": stratify,
        "bins": bins,
        "length_unit": f"tokens ({tokenizer_dir})" if tokenizer is not None else "characters",
        "counts": {
            "source": len(lengths),
            "subset": len(chosen),
            "source_by_assistant_turns": _by_turns(turns),
            "subset_by_assistant_turns": _by_turns([turns[i] for i in chosen]),
        },
        "length_quantiles": {"source": quantiles(lengths), "subset": quantiles([lengths[i] for i in chosen])},
    }
    manifest_path(output_path).write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return manifest


def _scan(input_path: Path, tokenizer) -> tuple[list[int], list[int]]:
    """First pass: each record's length (``record_lengths``, ``SCAN_BATCH`` records a call) and
    assistant turns, every line validated (``RecordError`` at the first bad one)."""
    lengths: list[int] = []
    turns: list[int] = []
    batch: list = []

    def flush():
        lengths.extend(record_lengths(batch, tokenizer))
        turns.extend(sum(m.role == "assistant" for m in r.messages) if isinstance(r, ChatRecord) else 0 for r in batch)
        batch.clear()

    reader = iter_lines(input_path, "--input file")
    for _, line, src in reader:  # the reader's own lines (split at \n only), so line i is record i
        try:
            batch.append(parse_line(line, src))
        except RecordError as err:
            reader.throw(err)  # raises err, or a DataFileError when the file was cut while being read
        if len(batch) >= SCAN_BATCH:
            flush()
    flush()
    return lengths, turns


def _copy_lines(input_path: Path, output_path: Path, chosen: list[int], before) -> str:
    """Second pass: write lines ``chosen`` (sorted) byte for byte, each ending with ``\n`` (line 1
    without its byte-order mark: the subset's first line may be any line); their sha256.

    Raises:
        DataFileError: the input changed since the first pass (``before``: its ``os.stat``).
        PathError: the output cannot be written.
    """
    def changed() -> bool:
        now = input_path.stat()
        return (now.st_size, now.st_mtime_ns, now.st_ino) != (before.st_size, before.st_mtime_ns, before.st_ino)

    h, want = hashlib.sha256(), iter(chosen)
    nxt = next(want, None)
    tmp = output_path.with_name(f".{output_path.name}.partial")  # renamed when whole: no half-written subset
    try:
        output_path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as out:
            for i, (_, line, _src) in enumerate(iter_lines(input_path, "--input file")):
                if i == nxt:
                    line = line if line.endswith(b"\n") else line + b"\n"
                    out.write(line)
                    h.update(line)
                    nxt = next(want, None)
                    if nxt is None:
                        break
        if changed():
            raise DataFileError(input_path, "--input file changed while the subset was drawn; run it again on a "
                                "file that stays put", "changed_while_read")
        tmp.replace(output_path)
    except PathError:  # the input's own error (an OSError too), not the output's
        raise
    except OSError as e:
        raise PathError(f"--output {output_path} cannot be written ({e.strerror})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return h.hexdigest()


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def manifest_path(output_path: str | Path) -> Path:
    """``runs/x/subset.jsonl`` -> ``runs/x/subset.manifest.json``.

    >>> str(manifest_path("runs/x/subset.jsonl"))
    'runs/x/subset.manifest.json'
    """
    p = Path(output_path)
    return p.with_name(p.name.removesuffix(".jsonl") + ".manifest.json")


def _by_turns(turns: list[int]) -> dict[str, int]:
    return {str(t): c for t, c in sorted(Counter(turns).items())}


@cli_entry("packlora subset")
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``packlora subset``: 0 ok, 1 bad input, 2 bad flags."""
    p = argparse.ArgumentParser(prog="packlora subset", description=description(__doc__))
    p.add_argument("--input", required=True, help="JSONL records (chats or {\"text\"})")
    p.add_argument("--output", required=True, help="JSONL to write; the manifest goes beside it")
    p.add_argument("--ratio", type=float, required=True, help="fraction of records to keep, in (0, 1], e.g. 0.2")
    p.add_argument("--seed", type=int, required=True, help="seed of the draw (same seed -> same bytes)")
    p.add_argument("--stratify", choices=STRATIFY, default="length",
                   help="length (default): by assistant turns and length bins; none: uniform")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory to measure length in tokens "
                   "(default: characters)")
    p.add_argument("--bins", type=int, default=10, help="length bins per turn count (default 10 = deciles)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    m = make_subset(args.input, args.output, args.ratio, args.seed, args.stratify, args.tokenizer, args.bins)
    q0, q1 = m["length_quantiles"]["source"], m["length_quantiles"]["subset"]
    print(f"wrote {m['counts']['subset']} of {m['counts']['source']} records to {args.output} "
          f"(by assistant turns {m['counts']['subset_by_assistant_turns']}); median length "
          f"{q0['p50']} -> {q1['p50']} {m['length_unit']}; manifest {manifest_path(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
