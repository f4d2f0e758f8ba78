"""records -> labelled segments -> packed rows, in stages, each returning a frozen record::

    read_stage      files -> RecordSet            parse every line, drop duplicates (counted), into Arrow
    split_stage     RecordSet -> Split            data.stage check, preset, hold-out draw, mix (indices)
    tokenize_stage  Split -> Tokenized            ChatFormat labels, overflow policy (counted)
    pack_stage      Tokenized -> Packed           best-fit-decreasing rows of max_seq_length
    audit_rows      Packed -> LabelAudit          what the loss will see (data_utils/audit.py)
    build_report    all of the above -> DataReport   (data_utils/report.py)

The functions ``datasets.map`` runs over Arrow batches (labelling, gathering rows) are in
``data_utils/kernels.py``; the chat format reaches its worker processes as an argument (a
``FormatRef`` when the tokenizer loads from its directory as it is, else the format itself).

The records stream: ``read_stage`` parses one line at a time and writes the valid, unique records
to a memory-mapped Arrow file a batch at a time (duplicates found by a 32-byte digest each, not the
text), the preset rewrites it a batch at a time, the draws and the weighted mix are index lists
(``Dataset.select``), and ``datasets.map`` labels it. No stage holds every record as Python objects,
so memory does not grow with the corpus beyond a few bytes a record (``benchmarks/RESULTS.md``).

``prepare_data`` runs them in order. Tokenised and packed datasets are cached as Arrow files
under ``data.cache_dir``, keyed by one hashed ``CacheKey`` of everything they depend on (file
contents, tokenizer and chat template, chat format, ``max_seq_length``, overflow policy, hold-out
draw...; ``data_utils/cache.py``), so a second run loads them instead of redoing the work, and a
change to any of those rebuilds them. The key is computed before any record is read: on a cache hit
``prepare_data`` parses nothing (``load_prepared``). Each stage shows a progress bar and logs one
line with its counts and seconds (logger ``packlora.data.prepare``). Nothing is lost silently:
every dropped, skipped or split example is counted in the ``DataReport``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import tempfile
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from packlora.core.errors import InputError
from packlora.data_utils.audit import audit_rows
from packlora.data_utils.cache import (DEFAULT_CACHE_DIR, PIPELINE_VERSION, CacheKey, dataset_saved, read_json,
                                       records_key, save_atomic, tokenizer_digest, write_json_atomic)
from packlora.data_utils.chat_format import ChatFormat, format_ref
from packlora.data_utils.config import DataConfig
from packlora.data_utils.kernels import (OverflowError_, certainly_too_long, pack_batch,  # noqa: F401 (re-exported)
                                         record_columns, record_schema, record_too_long, tokenize_batch)
from packlora.data_utils.packing import best_fit_decreasing, packing_efficiency
from packlora.data_utils.records import RecordError, SkipLog
from packlora.data_utils.report import (DROP_REASONS, ON_ERROR_REASONS, DataReport,  # noqa: F401 (re-exported)
                                        NoExampleError, build_report)
from packlora.data_utils.sources import iter_source, mix, parse_source
from packlora.data_utils.types import ChatRecord, Message, Source, TextRecord
from packlora.presets import GUARDED_ACTIONS, preset_edit, splice_system

logger = logging.getLogger(__name__)
PREP_LOG = logging.getLogger("packlora.data.prepare")
"""One line per process and ``prepare_data`` call: what it prepared, or that it loaded the cache
(logged at INFO on every rank: ``training/process.py``)."""


@dataclass(frozen=True)
class PreparedData:
    """Output of ``prepare_data``: packed training rows, evaluation rows, held-out chats, the report."""

    rows: Any  # datasets.Dataset with columns input_ids, labels, seq_lens
    heldout: list[ChatRecord]
    report: DataReport
    eval_rows: Any = None  # the same, for the evaluation loss (data.eval / data.eval_split), or None
    cache_key: str = ""  # CacheKey.digest() of the training rows: equal keys, equal rows in equal order


@dataclass(frozen=True)
class RecordSet:
    """``read_stage``: the valid, unique records of the sources, and how many lines were left out.

    ``records`` is a memory-mapped ``datasets.Dataset`` of ``count`` rows in ``kernels.record_schema``
    (``messages``, ``text``, ``source``, ``source_index``: the record's source in the list read), or
    None when ``read_stage`` only checked the sources. ``per_source`` maps each source's name to its
    ``lines_read``, unique ``records`` and ``skipped`` lines by reason (``lines_read == records +
    sum(skipped.values())``); ``first_skipped`` holds the first few skipped lines' errors, in reading
    order. ``record(i)`` gives one record back as a ``ChatRecord`` / ``TextRecord``."""

    records: Any
    count: int
    lines_read: int
    skipped: dict[str, int]
    per_source: dict[str, dict] = field(default_factory=dict)
    first_skipped: tuple[RecordError, ...] = ()

    def record(self, i: int) -> ChatRecord | TextRecord:
        return record_at(self.records, i)


@dataclass(frozen=True)
class Split:
    """``split_stage``: the training mix (a ``datasets.Dataset`` of ``record_schema`` rows, in mix
    order), held-out chats (and their indices among the records), the evaluation-loss records drawn by
    ``eval_split`` (a ``Dataset``, or None), what the preset did, and each source's share of the mix."""

    train: Any
    heldout: tuple[ChatRecord, ...]
    heldout_idx: tuple[int, ...]
    preset_actions: dict[str, int]
    eval: Any = None
    in_mix: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Tokenized:
    """``tokenize_stage``: the kept examples (a ``datasets.Dataset`` with ``input_ids``, ``labels``,
    ``length``), the drops by reason, and the counts the report needs."""

    examples: Any
    dropped: dict[str, int]
    counts: dict[str, int]
    cache_file: str


@dataclass(frozen=True)
class Packed:
    """``pack_stage``: rows (``input_ids``, ``labels``, ``seq_lens``) and how full they are."""

    rows: Any
    efficiency: float
    cache_file: str


def prepare_data(cfg: DataConfig, fmt: ChatFormat, *, seed: int = 42, preset=None,
                 preset_overrides_system: bool = False) -> PreparedData:
    """Read, label, pack and audit the data of ``cfg`` (see the module docstring for the stages).

    Args:
        cfg: the ``data:`` settings (sources, ``max_seq_length``, overflow and error policies, ...).
        fmt: the chat format (tokenizer, template, labels, control tokens).
        seed: seeds the hold-out and evaluation draws and the weighted mix.
        preset: a ``presets.Preset`` applied to every chat (held-out and evaluation ones too), or None.
        preset_overrides_system: let the preset replace a chat's own system message.

    Raises:
        RecordError: a malformed or duplicate line under ``on_error: error`` (file:line in the message).
        LabelError: a chat that cannot be labelled under ``on_error: error`` (its file:line too).
        OverflowError_: an over-long example under ``overflow: error``.
        NoExampleError: no example left (every record bad, duplicate, too long or untrained).
        ValueError: a record of the wrong kind for ``data.stage``, or too few records for the draws.
    """
    t0 = time.perf_counter()
    cache = Path(cfg.cache_dir or DEFAULT_CACHE_DIR)
    cache.mkdir(parents=True, exist_ok=True)
    key = data_cache_key(cfg, fmt, seed, preset, preset_overrides_system, cache)
    manifest = cache / f"prepared-{key.digest()}.json"
    loaded = load_prepared(manifest)
    if loaded is not None:
        _warn_dropped(loaded.report)
        PREP_LOG.info("data %s: loaded from the cache in %.2f s, nothing prepared (%d rows of %d examples; %s)",
                      key.digest(), time.perf_counter() - t0, loaded.report.rows, loaded.report.examples, manifest)
        return loaded
    # the records' Arrow files live only until the tokenised examples are saved
    cut = partial(record_too_long, fmt=fmt, cfg=cfg)
    with tempfile.TemporaryDirectory(prefix=".records-", dir=cache) as tmp:
        records = read_stage(cfg.sources("train"), cfg.format, cfg.on_error, into=Path(tmp) / "train", cut=cut)
        split = split_stage(records, cfg, seed, preset, preset_overrides_system)
        if cfg.eval:
            extra = read_stage(cfg.sources("eval"), cfg.format, cfg.on_error, into=Path(tmp) / "eval", cut=cut)
            split = replace(split, eval=_stage_and_preset(extra.records, cfg, preset, preset_overrides_system)[0])
        for name in ("train", "eval"):  # the pre-flight of a later launch need not read them again
            if cfg.sources(name):
                mark_records_checked(cfg.sources(name), cfg.format, cfg.on_error, cache)
        tokenized = tokenize_stage(split.train, fmt, cfg, key.digest(), cache, records)
        eval_tokenized = None
        if split.eval is not None:
            eval_tokenized = tokenize_stage(split.eval, fmt, cfg, key.digest("eval"), cache, None, part="evaluation")
    packed = pack_stage(tokenized, cfg, key.digest(), cache)
    eval_packed = pack_stage(eval_tokenized, cfg, key.digest("eval"), cache) if eval_tokenized else None
    report = build_report(records, split, tokenized, packed, audit_rows(packed.rows, fmt), cfg, fmt, eval_packed)
    _warn_dropped(report)
    prepared = PreparedData(packed.rows, list(split.heldout), report, eval_packed.rows if eval_packed else None,
                            cache_key=key.digest())
    store_prepared(manifest, prepared, packed.cache_file, eval_packed.cache_file if eval_packed else None,
                   records.first_skipped)
    PREP_LOG.info("data %s: prepared in %.1f s: %d lines read, %d records, %d held out, %d examples tokenised, "
                  "%d rows packed (%s)", key.digest(), time.perf_counter() - t0, report.lines_read, report.records,
                  report.heldout, report.examples, report.rows, manifest)
    return prepared


def data_cache_key(cfg: DataConfig, fmt: ChatFormat, seed: int, preset=None, override: bool = False,
                   cache: Path | None = None) -> CacheKey:
    """The ``CacheKey`` of ``prepare_data``'s arguments, from the sources' bytes and the settings,
    without parsing a record (file digests remembered under ``cache/digests``)."""
    specs = cfg.sources("train")
    memo = cache / "digests" if cache is not None else None
    return CacheKey(PIPELINE_VERSION, tuple(s.digest(memo) for s in (*specs, *cfg.sources("eval"))),
                    tokenizer_digest(fmt.tokenizer), (fmt.name, fmt.enable_thinking, fmt.train_reasoning),
                    (cfg.format, cfg.max_seq_length, cfg.overflow, cfg.stage, cfg.text_eos, cfg.labels, cfg.on_error,
                     cfg.packing, [(s.weight, s.max_records) for s in specs], cfg.eval_split, cfg.eval_holdout),
                    f"{preset!r}/{override}", seed)


def store_prepared(manifest: Path, data: PreparedData, rows_dir: str, eval_rows_dir: str | None,
                   first_skipped=()) -> None:
    """Write what ``load_prepared`` needs besides the Arrow rows: the report, the held-out chats, the
    row directories and the first skipped lines (logged again on a cache hit)."""
    heldout = [{"messages": r.as_dicts(), "source": [r.source.path, r.source.line]} for r in data.heldout]
    write_json_atomic({"report": data.report.to_dict(), "heldout": heldout, "rows": rows_dir,
                       "eval_rows": eval_rows_dir, "cache_key": data.cache_key,
                       "first_skipped": [str(e) for e in first_skipped]}, manifest)


def load_prepared(manifest: Path) -> PreparedData | None:
    """The ``PreparedData`` that ``store_prepared`` wrote, or None when it or a row directory is missing."""
    saved = read_json(manifest)
    try:
        if not all(dataset_saved(d) for d in (saved["rows"], saved["eval_rows"]) if d):
            return None
        heldout = [ChatRecord(tuple(Message(m["role"], m["content"], m.get("reasoning_content")) for m in h["messages"]),
                              Source(*h["source"])) for h in saved["heldout"]]
        report = DataReport(**saved["report"])
    except (KeyError, TypeError):  # missing, or written by another version: prepare again
        return None
    import datasets

    for line in saved.get("first_skipped", ()):
        logger.warning("skipped (data.on_error=skip): %s", line)
    eval_rows = datasets.load_from_disk(saved["eval_rows"]) if saved["eval_rows"] else None
    return PreparedData(datasets.load_from_disk(saved["rows"]), heldout, report, eval_rows, cache_key=saved["cache_key"])


def progress(items, desc: str, unit: str, total: int | None = None):
    """``items`` behind a progress bar (``datasets``' tqdm: hidden when ``datasets.disable_progress_bars()``
    was called), or with ``items=None`` a bar to ``update(n)``. Only the process that prepares the data
    iterates, so only it shows bars."""
    from datasets.utils.logging import tqdm

    return tqdm(items, desc=desc, unit=f" {unit}", total=total if total is not None else
                len(items) if hasattr(items, "__len__") else None)


def _warn_dropped(report: DataReport) -> None:
    for reason, n in report.dropped.items():
        hint = "data.on_error" if reason in ON_ERROR_REASONS else "data.overflow / data.max_seq_length"
        logger.warning("dropped %d example(s): %s (see %s)", n, reason, hint)


def records_checked(sources, format: str = "auto", on_error: str = "error", cache: Path | None = None) -> bool:
    """Whether ``read_stage`` already read these sources (same bytes) without error: the launcher's
    pre-flight then need not read them again (``mark_records_checked``)."""
    cache = Path(cache or DEFAULT_CACHE_DIR)
    specs = [parse_source(s) for s in sources]
    key = records_key([s.digest(cache / "digests") for s in specs], format, on_error)
    return (cache / f"records-{key}.json").is_file()


def mark_records_checked(sources, format: str, on_error: str, cache: Path | None = None) -> None:
    """Remember that ``read_stage(sources, format, on_error)`` read them without error."""
    cache = Path(cache or DEFAULT_CACHE_DIR)
    specs = [parse_source(s) for s in sources]
    key = records_key([s.digest(cache / "digests") for s in specs], format, on_error)
    write_json_atomic({"sources": [s.name for s in specs]}, cache / f"records-{key}.json")


def read_stage(sources, format: str = "auto", on_error: str = "error", into: Path | None = None,
               cut=None) -> RecordSet:
    """Every record of ``sources`` (``SourceSpec`` or paths), streamed: with ``into``, written to the
    Arrow file ``into.arrow`` a batch at a time (``RecordSet.records``); without, only checked and
    counted (the launcher's pre-flight). ``cut(record)`` (``kernels.record_too_long``), when given,
    finds a huge record certainly too long as it is read: its text is not written (``too_long``
    column), and it is counted as ``too_long`` when tokenised. Duplicates (equal after normalising whitespace, compared by
    ``record_key``: 32 bytes a record) are errors, or under ``on_error: skip`` left out and counted
    with the bad lines.

    Raises:
        RecordError: a bad or duplicate line under ``on_error: error``.
        NoExampleError: every line was skipped.
    """
    t0 = time.perf_counter()
    specs = [parse_source(s) for s in sources]
    skipped = SkipLog()
    first: dict[bytes, int] = {}  # record_key -> index of its first copy: 32 bytes a record, not its text
    first_source, first_line = array("i"), array("q")  # where each kept record came from
    paths: dict[int, str] = {}
    per_source = {s.name: {"lines_read": 0, "records": 0} for s in specs}
    yielded = Counter()
    writer = _RecordWriter(into) if into is not None else None
    try:
        for k, spec in enumerate(specs):
            for r in progress(iter_source(spec, format, on_error, skipped), f"Reading {Path(spec.path).name}",
                              "records"):
                yielded[spec.name] += 1
                key = record_key(r)
                j = first.get(key)
                if j is not None:
                    where = Source(paths[first_source[j]], first_line[j])
                    err = RecordError(r.source, f"duplicate record: same content as {where} (after normalising "
                                      "whitespace); remove one copy, or set data.on_error=skip to drop it (counted as "
                                      "'duplicate')", "duplicate")
                    if on_error == "error":
                        raise err
                    skipped.append(err)
                    continue
                first[key] = len(first_line)
                paths.setdefault(k, r.source.path)
                first_source.append(k)
                first_line.append(r.source.line)
                if writer is not None:
                    writer.add(r, k, cut(r) if cut is not None else None)
                per_source[spec.name]["records"] += 1
    finally:
        dataset = writer.close() if writer is not None else None
    count = len(first_line)
    for name, counts in per_source.items():  # every line read is a record, a duplicate or a bad line
        counts["skipped"] = skipped.for_source(name)
        counts["lines_read"] = yielded[name] + sum(n for reason, n in counts["skipped"].items() if reason != "duplicate")
    for e in skipped.first:
        logger.warning("skipped (data.on_error=skip): %s", e)
    drops = skipped.by_reason()
    lines = count + len(skipped)
    names = [s.name for s in specs]
    if not count:
        raise NoExampleError(
            f"no example left to train on: {drops} dropped of {lines} lines in {names}. Every line was skipped; "
            "set data.on_error=error to stop at the first bad line and see why",
            {"lines_read": lines, "records": 0, "examples": 0, "dropped": drops})
    PREP_LOG.info("read %d lines of %d source(s) in %.1f s: %d records, %d skipped %s", lines, len(specs),
                  time.perf_counter() - t0, count, len(skipped), drops or "")
    return RecordSet(dataset, count, lines, drops, per_source, tuple(skipped.first))


class _RecordWriter:
    """Records into an Arrow stream file (``record_schema``), ``batch_size`` at a time; ``close()``
    gives the file back as a memory-mapped ``datasets.Dataset``."""

    def __init__(self, into: Path, batch_size: int = 1000):
        import pyarrow as pa

        into.parent.mkdir(parents=True, exist_ok=True)
        self.path = into.with_suffix(".arrow")
        self.schema = record_schema()
        self.writer = pa.ipc.new_stream(str(self.path), self.schema)
        self.batch_size = batch_size
        self.rows: list[tuple] = []

    def add(self, record: ChatRecord | TextRecord, source_index: int, too_long: int | None = None) -> None:
        self.rows.append((*record_columns(record, too_long), source_index, -1 if too_long is None else too_long))
        if len(self.rows) >= self.batch_size:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.rows:
            columns = list(zip(*self.rows))
            self.writer.write_batch(pa.record_batch(
                [pa.array(c, type=f.type) for c, f in zip(columns, self.schema)], schema=self.schema))
            self.rows = []

    def close(self):
        import datasets

        try:
            self._flush()
        finally:
            self.writer.close()
        return datasets.Dataset.from_file(str(self.path))


def record_at(records, i: int) -> ChatRecord | TextRecord:
    """Row ``i`` of a ``record_schema`` dataset as a ``ChatRecord`` (or ``TextRecord``)."""
    row = records[i]
    path, _, line = row["source"].rpartition(":")
    source = Source(path, int(line))
    if row["messages"] is None:
        return TextRecord(row["text"], source)
    return ChatRecord(tuple(Message(m["role"], m["content"], m["reasoning_content"]) for m in row["messages"]), source)


def split_stage(records: RecordSet, cfg: DataConfig, seed: int, preset=None, override: bool = False) -> Split:
    """Refuse records of the wrong kind for ``data.stage`` and apply the preset to every chat; draw
    ``data.eval_holdout`` chats (seeded) to decode after training, then ``data.eval_split`` records
    for the evaluation loss; mix the rest by each source's ``weight`` (``sources.mix``). The draws
    and the mix are index lists over the records' Arrow file (``Dataset.select``), not copies.

    Raises:
        ValueError: a chat under ``stage: pretrain``, a text record under ``stage: sft``, or too few
            records for the draws.
    """
    import numpy as np

    t0 = time.perf_counter()
    out, actions = _stage_and_preset(records.records, cfg, preset, override)
    is_chat = out.data.column("messages").is_valid().to_numpy(zero_copy_only=False)
    cut = out.data.column("too_long").to_numpy() >= 0  # a chat found certainly too long is no prompt to decode
    held = _draw_heldout(is_chat & ~cut, cfg.eval_holdout, seed)
    keep = np.ones(len(out), dtype=bool)
    keep[np.asarray(held, dtype=np.int64)] = False
    rest = np.flatnonzero(keep)
    evals = _draw_eval(rest.tolist(), cfg.eval_split, seed)
    keep[np.asarray(evals, dtype=np.int64)] = False
    source_of = out.data.column("source_index").to_numpy()
    by_source = [(spec, np.flatnonzero(keep & (source_of == k)).tolist())
                 for k, spec in enumerate(cfg.sources("train"))]
    train, in_mix = mix(by_source, seed)
    PREP_LOG.info("split %d records in %.1f s: %d to train (after weights), %d held out, %d for the evaluation loss",
                  len(out), time.perf_counter() - t0, len(train), len(held), len(evals))
    return Split(out.select(train), tuple(record_at(out, i) for i in held), tuple(held), dict(sorted(actions.items())),
                 out.select(evals) if evals else None, in_mix)


def _stage_and_preset(records, cfg: DataConfig, preset, override: bool):
    """``records`` (a ``record_schema`` dataset) checked for ``data.stage`` and, with a preset, rewritten
    a batch at a time into a new Arrow file beside it; returns it and the preset's actions."""
    import pyarrow as pa
    import pyarrow.compute as pc

    is_chat = records.data.column("messages").is_valid()
    wrong = {"pretrain": is_chat, "sft": pc.invert(is_chat)}.get(cfg.stage)
    if wrong is not None:
        at = pc.index(wrong, True).as_py()
        if at >= 0:
            kind = "a chat" if cfg.stage == "pretrain" else "a {'text'} record"
            raise InputError(f"{records[at]['source']}: {kind} under data.stage={cfg.stage}; stage 1 (pretrain) trains "
                             "on {'text'} records, stage 2 (sft) on chats. Fix data.train or set data.stage: auto")
    actions: Counter = Counter()
    bar = progress(None, "Splitting (stage check, preset)", "records", total=len(records))
    if preset is None:  # the stage check above was the whole pass
        bar.update(len(records))
        bar.close()
        return records, actions
    import datasets

    path = Path(records.cache_files[0]["filename"]).with_suffix(".preset.arrow")
    schema = records.data.schema
    with pa.ipc.new_stream(str(path), schema) as writer:
        for batch in records.data.to_batches(max_chunksize=1000):
            messages = []
            for msgs in batch.column("messages").to_pylist():
                if msgs:  # not a text record, nor a chat cut as too long as it was read
                    first = msgs[0]
                    action, system = preset_edit((first["role"], first["content"]), preset, override)
                    actions[action] += 1
                    if system is not None:
                        msgs = splice_system(msgs, action, {"role": "system", "content": system,
                                                            "reasoning_content": None})
                messages.append(msgs)
            writer.write_batch(pa.record_batch([pa.array(messages, type=schema.field("messages").type),
                                                *batch.columns[1:]], schema=schema))
            bar.update(batch.num_rows)
    bar.close()
    logger.info("preset %s: %d of %d chats now carry its guard (%s); a chat with a system message of its own keeps "
                "it unless preset_overrides_system is true", preset.name,
                sum(n for a, n in actions.items() if a in GUARDED_ACTIONS), sum(actions.values()),
                ", ".join(f"{a}: {n}" for a, n in sorted(actions.items())) or "no chats")
    return datasets.Dataset.from_file(str(path)), actions


def tokenize_stage(train, fmt: ChatFormat, cfg: DataConfig, key: str, cache: Path, records: RecordSet | None,
                   part: str = "training") -> Tokenized:
    """Label every record (``ChatFormat.encode_chat`` for chats, ``ChatFormat.encode_text`` for text) and
    apply the overflow policy, with ``datasets.map`` over ``data.num_proc`` processes; the result is
    cached in ``cache/tokenized-KEY`` (``save_to_disk``), whatever ``num_proc`` was.

    Raises:
        LabelError, OverflowError_: under ``on_error: error`` / ``overflow: error``.
        NoExampleError: every example was dropped.
    """
    import datasets

    t0 = time.perf_counter()
    tok_dir = cache / f"tokenized-{key}"
    if not dataset_saved(tok_dir):
        raw = train
        num_proc = cfg.resolved_num_proc(len(raw))
        # workers get the format by reference (a directory and a digest) when it loads as it is, else itself
        ref = format_ref(fmt) if num_proc > 1 else None
        # new_fingerprint: the cache key already says what the output depends on; without it datasets
        # hashes fn_kwargs, i.e. pickles the whole tokenizer, for every map call (seconds per call)
        out = raw.map(tokenize_batch, batched=True, remove_columns=raw.column_names,
                      fn_kwargs=dict(fmt=ref or fmt, cfg=cfg), num_proc=num_proc if num_proc > 1 else None,
                      new_fingerprint=f"tokenized-{key}",
                      desc=f"Tokenising ({num_proc} process{'es' if num_proc > 1 else ''})")
        save_atomic(out, tok_dir)
    out = datasets.load_from_disk(str(tok_dir))  # not map's output: that sits beside the records, deleted after
    reasons = out.data.column("drop_reason").to_pylist()
    dropped = Counter(r for r in reasons if r)
    kept = [i for i, r in enumerate(reasons) if not r]
    if not kept:
        earlier = Counter(records.skipped) if records else Counter()
        raise NoExampleError(
            f"no example left {'to train on' if part == 'training' else 'in the ' + part + ' data'}: {dict(dropped)} "
            f"dropped of {len(train)} records. "
            f"Check data.max_seq_length ({cfg.max_seq_length}), data.overflow and the data",
            {"lines_read": records.lines_read if records else 0, "records": records.count if records else 0,
             "examples": 0, "dropped": dict(sorted((dropped + earlier).items()))})
    counts = {c: sum(out.data.column(c).to_pylist())
              for c in ("assistant_turns", "chunks", "per_turn", "render_mismatch", "control_text")}
    PREP_LOG.info("tokenised %d %s records in %.1f s: %d examples, %d dropped %s", len(train), part,
                  time.perf_counter() - t0, len(kept), sum(dropped.values()), dict(dropped) or "")
    return Tokenized(out.select(kept), dict(dropped), counts, str(tok_dir))


def pack_stage(tokenized: Tokenized, cfg: DataConfig, key: str, cache: Path) -> Packed:
    """Best-fit-decreasing bins of the examples (or one per row without packing), as cached rows."""
    import datasets

    t0 = time.perf_counter()
    lengths = tokenized.examples.with_format("arrow")["length"].to_pylist()
    L = cfg.max_seq_length
    pack_dir = cache / (f"packed-{key}" if cfg.packing else f"unpacked-{key}")
    if not dataset_saved(pack_dir):
        bins = best_fit_decreasing(lengths, L) if cfg.packing else [[i] for i in range(len(lengths))]
        # map's output goes to a file a batch at a time: with no cache_file_name, the input being in
        # memory, datasets would keep every packed row in RAM (grows with the corpus: 0.3 GB at 80k chats)
        with tempfile.TemporaryDirectory(prefix=f".{pack_dir.name}-", dir=cache) as tmp:
            rows = datasets.Dataset.from_dict({"members": bins}).map(
                pack_batch, batched=True, remove_columns=["members"], fn_kwargs=dict(kept=tokenized.examples),
                new_fingerprint=f"packed-{key}", desc="Packing", cache_file_name=str(Path(tmp) / "rows.arrow"))
            save_atomic(rows, pack_dir)
    rows = datasets.load_from_disk(str(pack_dir))
    efficiency = round(packing_efficiency(lengths, len(rows), L), 6)
    PREP_LOG.info("packed %d examples in %.1f s: %d rows of %d tokens, %.1f%% full", len(lengths),
                  time.perf_counter() - t0, len(rows), L, 100 * efficiency)
    return Packed(rows, efficiency, str(pack_dir))


def record_key(record: ChatRecord | TextRecord) -> bytes:
    """sha256 (32 bytes) of a record after normalising whitespace (strip, runs of whitespace -> one space).

    >>> from packlora.data_utils.types import Source
    >>> a = ChatRecord((Message("user", "Hi  there"), Message("assistant", "Yes.")), Source("a", 1))
    >>> b = ChatRecord((Message("user", " Hi there"), Message("assistant", "Yes.\\n")), Source("a", 2))
    >>> record_key(a) == record_key(b), record_key(a) == record_key(TextRecord("Hi there Yes.", Source("a", 3)))
    (True, False)
    """
    if isinstance(record, ChatRecord):
        payload = [[m.role, _normalized_digest(m.content), _normalized_digest(m.reasoning or "")]
                   for m in record.messages]
    else:
        payload = ["text", _normalized_digest(record.text)]
    return hashlib.sha256(json.dumps(payload).encode()).digest()


_CHUNK = 1 << 20  # characters: a 50 MB message is normalised and hashed a chunk at a time


def _normalized_digest(text: str) -> str:
    """sha256 of ``" ".join(text.split())`` (UTF-8), without building it: chunk by chunk, a word cut
    by a chunk boundary joined again, so memory stays at one chunk.

    >>> import hashlib
    >>> t = " a  b\\n c" + "d" * (_CHUNK - 2) + "e f " * 3
    >>> _normalized_digest(t) == hashlib.sha256(" ".join(t.split()).encode()).hexdigest()
    True
    """
    h = hashlib.sha256()
    started = in_word = False
    for i in range(0, len(text), _CHUNK):
        chunk = text[i: i + _CHUNK]
        words = chunk.split()
        if words:
            if started and not (in_word and not chunk[0].isspace()):
                h.update(b" ")
            h.update(" ".join(words).encode("utf-8", "surrogatepass"))
            started = True
        in_word = bool(chunk) and not chunk[-1].isspace() if words else False
    return h.hexdigest()


def _draw_eval(candidates: list[int], split, seed: int) -> list[int]:
    """``data.eval_split`` of ``candidates`` (a fraction or a count), drawn with a seed of its own."""
    if split is None:
        return []
    n = round(split * len(candidates)) if isinstance(split, float) else split
    if not 1 <= n < len(candidates):
        raise InputError(f"data.eval_split={split} draws {n} of {len(candidates)} records; leave at least one to "
                         "train on and draw at least one")
    return sorted(random.Random(seed + 1).sample(candidates, n))


def _draw_heldout(is_chat, n: int, seed: int) -> list[int]:
    """``n`` indices (sorted, seeded) of the records where ``is_chat`` (a boolean array) is true."""
    import numpy as np

    if n == 0:
        return []
    chats = np.flatnonzero(is_chat).tolist()
    if n >= len(chats):
        raise InputError(f"data.eval_holdout={n} but there are only {len(chats)} chat records; lower it")
    return sorted(random.Random(seed).sample(chats, n))
