"""records -> labelled segments -> packed rows, in stages, each returning a frozen record::

    read_stage      files -> RecordSet            parse every line, drop duplicates (counted)
    split_stage     RecordSet -> Split            data.stage check, preset, hold-out draw
    tokenize_stage  Split -> Tokenized            ChatFormat labels, overflow policy (counted)
    pack_stage      Tokenized -> Packed           best-fit-decreasing rows of max_seq_length
    audit_rows      Packed -> LabelAudit          what the loss will see (data_utils/audit.py)
    build_report    all of the above -> DataReport

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
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from packlora.core.errors import InputError
from packlora.data_utils.audit import audit_rows
from packlora.data_utils.cache import (DEFAULT_CACHE_DIR, PIPELINE_VERSION, CacheKey, dataset_saved, read_json,
                                       records_key, save_atomic, tokenizer_digest, write_json_atomic)
from packlora.data_utils.chat_format import LABEL_REASONS, ChatFormat, EncodedChat, LabelError
from packlora.data_utils.config import DataConfig
from packlora.data_utils.packing import best_fit_decreasing, packing_efficiency
from packlora.data_utils.records import REASONS, RecordError, SkipLog
from packlora.data_utils.sources import iter_source, mix, parse_source
from packlora.data_utils.tokenize_text import split_segment
from packlora.data_utils.types import ChatRecord, Message, Segment, Source, TextRecord
from packlora.presets import GUARDED_ACTIONS, apply_preset

logger = logging.getLogger(__name__)
PREP_LOG = logging.getLogger("packlora.data.prepare")
"""One line per process and ``prepare_data`` call: what it prepared, or that it loaded the cache
(logged at INFO on every rank: ``training/process.py``)."""

DROP_REASONS = (*REASONS, "duplicate", *LABEL_REASONS, "too_long", "no_trained_tokens")
"""Every reason the data report counts a line or example under (``DataReport.dropped``): a bad line
(``records.REASONS``), a duplicate record, a chat that cannot be labelled (``chat_format.LABEL_REASONS``),
an example over ``max_seq_length`` under ``overflow: drop``, an example with nothing to train."""


class OverflowError_(InputError):
    """An example is longer than ``max_seq_length`` under ``overflow: error``."""


class NoExampleError(InputError):
    """Every example was dropped or skipped; ``report`` holds the counts (a dict) for data_report.json."""

    def __init__(self, message: str, report: dict):
        self.report = report
        super().__init__(message)

    def __reduce__(self):
        return type(self), (str(self), self.report)


@dataclass(frozen=True)
class DataReport:
    """What happened to the data (units in the field names' terms: lines, records, examples, rows, tokens).

    ``lines_read`` counts the lines of the input files; ``records`` the valid, unique ones among
    them; ``examples`` the segments kept for training (a split text document counts once per
    chunk, a chat split per assistant turn once per turn). ``dropped`` maps a reason to a count: a
    bad line skipped under ``data.on_error: skip`` (one of ``records.REASONS``), ``duplicate``, a
    chat that cannot be labelled under ``skip`` (``template_mismatch``, ``no_end_of_turn``,
    ``reasoning_with_thinking_off``), ``too_long`` (over ``max_seq_length`` under ``overflow:
    drop``), ``no_trained_tokens``. ``preset_actions`` counts what the preset did to each chat
    (``presets.PresetAction``), held-out chats included, and ``chats_with_guard`` how many end up
    with its guard. ``chats_split_per_turn`` counts chats whose template renders earlier turns
    differently once a later turn exists (Qwen3), trained as one example per assistant turn;
    ``render_mismatch`` the examples whose ids do not decode to the template's rendering (an
    audit); ``messages_with_control_text`` the messages whose text spells a control token (kept as
    text). The label audit's counts are in ``supervised_tokens`` ... ``turns_with_end_of_turn_trained``.
    ``sources`` gives each source's ``lines_read``, unique ``records``, ``skipped`` lines by reason
    (``lines_read == records + sum(skipped.values())``) and ``in_mix`` (records in the training mix
    after hold-outs and ``weight``); ``evaluation`` the evaluation-loss set's ``records``,
    ``examples`` and ``rows``. Every reason is one of ``DROP_REASONS``.
    """

    records: int
    heldout: int
    examples: int
    dropped: dict[str, int]
    split_chunks: int
    rows: int
    packing_efficiency: float
    supervised_tokens: int
    role_markers_in_labels: int
    control_tokens_in_labels: int
    turns_with_end_of_turn_trained: int
    assistant_turns: int
    max_seq_length: int
    chat_format: str
    cache_files: list[str] = field(default_factory=list)
    lines_read: int = 0
    chats_with_guard: int = 0
    preset_actions: dict[str, int] = field(default_factory=dict)
    chats_split_per_turn: int = 0
    render_mismatch: int = 0
    messages_with_control_text: int = 0
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    evaluation: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


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

    ``source_of[i]`` is the index (in ``data.train``) of the source ``records[i]`` came from;
    ``per_source`` maps each source's name to its ``lines_read``, unique ``records`` and ``skipped``
    lines by reason (``lines_read == records + sum(skipped.values())``); ``first_skipped`` holds the
    first few skipped lines' errors, in reading order."""

    records: tuple[ChatRecord | TextRecord, ...]
    lines_read: int
    skipped: dict[str, int]
    source_of: tuple[int, ...] = ()
    per_source: dict[str, dict] = field(default_factory=dict)
    first_skipped: tuple[RecordError, ...] = ()


@dataclass(frozen=True)
class Split:
    """``split_stage``: the training mix, held-out chats (and their indices), the evaluation-loss
    records drawn by ``eval_split``, what the preset did, and each source's share of the mix."""

    train: tuple[ChatRecord | TextRecord, ...]
    heldout: tuple[ChatRecord, ...]
    heldout_idx: tuple[int, ...]
    preset_actions: dict[str, int]
    eval: tuple[ChatRecord | TextRecord, ...] = ()
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
    specs = cfg.sources("train")
    records = read_stage(specs, cfg.format, cfg.on_error)
    split = split_stage(records, cfg, seed, preset, preset_overrides_system)
    if cfg.eval:
        extra = read_stage(cfg.sources("eval"), cfg.format, cfg.on_error)
        split = replace(split, eval=tuple(_stage_and_preset(extra.records, cfg, preset, preset_overrides_system)[0]))
    for name in ("train", "eval"):  # the pre-flight of a later launch need not read them again
        if cfg.sources(name):
            mark_records_checked(cfg.sources(name), cfg.format, cfg.on_error, cache)
    tokenized = tokenize_stage(split.train, fmt, cfg, key.digest(), cache, records)
    packed = pack_stage(tokenized, cfg, key.digest(), cache)
    eval_packed = None
    if split.eval:
        eval_tokenized = tokenize_stage(split.eval, fmt, cfg, key.digest("eval"), cache, None, part="evaluation")
        eval_packed = pack_stage(eval_tokenized, cfg, key.digest("eval"), cache)
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
    if not isinstance(saved, dict) or not all(dataset_saved(d) for d in (saved["rows"], saved["eval_rows"]) if d):
        return None
    import datasets

    heldout = [ChatRecord(tuple(Message(m["role"], m["content"], m.get("reasoning_content")) for m in h["messages"]),
                          Source(*h["source"])) for h in saved["heldout"]]
    for line in saved["first_skipped"]:
        logger.warning("skipped (data.on_error=skip): %s", line)
    eval_rows = datasets.load_from_disk(saved["eval_rows"]) if saved["eval_rows"] else None
    return PreparedData(datasets.load_from_disk(saved["rows"]), heldout, DataReport(**saved["report"]), eval_rows,
                        cache_key=saved["cache_key"])


def progress(items, desc: str, unit: str):
    """``items`` behind a progress bar (``datasets``' tqdm: hidden when ``datasets.disable_progress_bars()``
    was called). Only the process that prepares the data iterates, so only it shows bars."""
    from datasets.utils.logging import tqdm

    return tqdm(items, desc=desc, unit=f" {unit}", total=len(items) if hasattr(items, "__len__") else None)


def _warn_dropped(report: DataReport) -> None:
    for reason, n in report.dropped.items():
        hint = "data.on_error" if reason in (*REASONS, "duplicate") else "data.overflow / data.max_seq_length"
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


def read_stage(sources, format: str = "auto", on_error: str = "error") -> RecordSet:
    """Every record of ``sources`` (``SourceSpec`` or paths); duplicates (equal after normalising
    whitespace) are errors, or under ``on_error: skip`` left out and counted with the bad lines.

    Raises:
        RecordError: a bad or duplicate line under ``on_error: error``.
        NoExampleError: every line was skipped.
    """
    t0 = time.perf_counter()
    specs = [parse_source(s) for s in sources]
    skipped = SkipLog()
    first: dict[str, ChatRecord | TextRecord] = {}
    unique, source_of = [], []
    per_source = {s.name: {"lines_read": 0, "records": 0} for s in specs}
    yielded = Counter()
    for k, spec in enumerate(specs):
        for r in progress(iter_source(spec, format, on_error, skipped), f"Reading {Path(spec.path).name}", "records"):
            yielded[spec.name] += 1
            key = record_key(r)
            if key in first:
                err = RecordError(r.source, f"duplicate record: same content as {first[key].source} (after normalising "
                                  "whitespace); remove one copy, or set data.on_error=skip to drop it (counted as "
                                  "'duplicate')", "duplicate")
                if on_error == "error":
                    raise err
                skipped.append(err)
                continue
            first[key] = r
            unique.append(r)
            source_of.append(k)
            per_source[spec.name]["records"] += 1
    for name, counts in per_source.items():  # every line read is a record, a duplicate or a bad line
        counts["skipped"] = skipped.for_source(name)
        counts["lines_read"] = yielded[name] + sum(n for reason, n in counts["skipped"].items() if reason != "duplicate")
    for e in skipped.first:
        logger.warning("skipped (data.on_error=skip): %s", e)
    drops = skipped.by_reason()
    lines = len(unique) + len(skipped)
    names = [s.name for s in specs]
    if not unique:
        raise NoExampleError(
            f"no example left to train on: {drops} dropped of {lines} lines in {names}. Every line was skipped; "
            "set data.on_error=error to stop at the first bad line and see why",
            {"lines_read": lines, "records": 0, "examples": 0, "dropped": drops})
    PREP_LOG.info("read %d lines of %d source(s) in %.1f s: %d records, %d skipped %s", lines, len(specs),
                  time.perf_counter() - t0, len(unique), len(skipped), drops or "")
    return RecordSet(tuple(unique), lines, drops, tuple(source_of), per_source, tuple(skipped.first))


def split_stage(records: RecordSet, cfg: DataConfig, seed: int, preset=None, override: bool = False) -> Split:
    """Refuse records of the wrong kind for ``data.stage`` and apply the preset to every chat; draw
    ``data.eval_holdout`` chats (seeded) to decode after training, then ``data.eval_split`` records
    for the evaluation loss; mix the rest by each source's ``weight`` (``sources.mix``).

    Raises:
        ValueError: a chat under ``stage: pretrain``, a text record under ``stage: sft``, or too few
            records for the draws.
    """
    t0 = time.perf_counter()
    out, actions = _stage_and_preset(records.records, cfg, preset, override)
    held = _draw_heldout(out, cfg.eval_holdout, seed)
    rest = [i for i in range(len(out)) if i not in set(held)]
    evals = set(_draw_eval(rest, cfg.eval_split, seed))
    specs = cfg.sources("train") if records.source_of else []
    by_source = [(spec, [out[i] for i in rest if i not in evals and records.source_of[i] == k])
                 for k, spec in enumerate(specs)]
    train, in_mix = mix(by_source, seed) if specs else ([out[i] for i in rest if i not in evals], {})
    PREP_LOG.info("split %d records in %.1f s: %d to train (after weights), %d held out, %d for the evaluation loss",
                  len(out), time.perf_counter() - t0, len(train), len(held), len(evals))
    return Split(tuple(train), tuple(out[i] for i in held), tuple(held), dict(sorted(actions.items())),
                 tuple(out[i] for i in sorted(evals)), in_mix)


def _stage_and_preset(records, cfg: DataConfig, preset, override: bool):
    wrong = {"pretrain": ChatRecord, "sft": TextRecord}.get(cfg.stage)
    actions: Counter = Counter()
    out = []
    for r in progress(records, "Splitting (stage check, preset)", "records"):
        if wrong is not None and isinstance(r, wrong):
            kind = "a chat" if wrong is ChatRecord else "a {'text'} record"
            raise InputError(f"{r.source}: {kind} under data.stage={cfg.stage}; stage 1 (pretrain) trains on {{'text'}} "
                             "records, stage 2 (sft) on chats. Fix data.train or set data.stage: auto")
        if preset is not None and isinstance(r, ChatRecord):
            messages, action = apply_preset(r.as_dicts(), preset, override)
            actions[action] += 1
            r = ChatRecord(tuple(Message(m["role"], m["content"], m.get("reasoning_content")) for m in messages), r.source)
        out.append(r)
    if preset is not None:
        logger.info("preset %s: %d of %d chats now carry its guard (%s); a chat with a system message of its own keeps "
                    "it unless preset_overrides_system is true", preset.name,
                    sum(n for a, n in actions.items() if a in GUARDED_ACTIONS), sum(actions.values()),
                    ", ".join(f"{a}: {n}" for a, n in sorted(actions.items())) or "no chats")
    return out, actions


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
    if dataset_saved(tok_dir):
        out = datasets.load_from_disk(str(tok_dir))
    else:
        cut = [_certainly_too_long(r, fmt, cfg) for r in train]  # huge records: never copied into Arrow
        raw = datasets.Dataset.from_dict({
            "messages": [json.dumps(r.as_dicts(), ensure_ascii=False) if isinstance(r, ChatRecord) and c is None else ""
                         for r, c in zip(train, cut)],
            "text": [r.text if isinstance(r, TextRecord) and c is None else "" for r, c in zip(train, cut)],
            "source": [str(r.source) for r in train],
            "too_long": [-1 if c is None else c for c in cut],
        })
        num_proc = cfg.resolved_num_proc(len(raw))
        shared = num_proc > 1 and _workers_fork()
        if shared:  # forked workers inherit the format: no tokenizer pickled and rebuilt per worker
            _FORMATS[key] = fmt
        try:
            # new_fingerprint: the cache key already says what the output depends on; without it datasets
            # hashes fn_kwargs, i.e. pickles the whole tokenizer, for every map call (seconds per call)
            out = raw.map(_tokenize_batch, batched=True, remove_columns=raw.column_names,
                          fn_kwargs=dict(fmt=key if shared else fmt, cfg=cfg), num_proc=num_proc if num_proc > 1 else None,
                          new_fingerprint=f"tokenized-{key}",
                          desc=f"Tokenising ({num_proc} process{'es' if num_proc > 1 else ''})")
        finally:
            _FORMATS.pop(key, None)
        save_atomic(out, tok_dir)
    reasons = out.data.column("drop_reason").to_pylist()
    dropped = Counter(r for r in reasons if r)
    kept = [i for i, r in enumerate(reasons) if not r]
    if not kept:
        earlier = Counter(records.skipped) if records else Counter()
        raise NoExampleError(
            f"no example left {'to train on' if part == 'training' else 'in the ' + part + ' data'}: {dict(dropped)} "
            f"dropped of {len(train)} records. "
            f"Check data.max_seq_length ({cfg.max_seq_length}), data.overflow and the data",
            {"lines_read": records.lines_read if records else 0, "records": len(records.records) if records else 0,
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
    if dataset_saved(pack_dir):
        rows = datasets.load_from_disk(str(pack_dir))
    else:
        bins = best_fit_decreasing(lengths, L) if cfg.packing else [[i] for i in range(len(lengths))]
        rows = datasets.Dataset.from_dict({"members": bins}).map(
            _pack_batch, batched=True, remove_columns=["members"], fn_kwargs=dict(kept=tokenized.examples),
            new_fingerprint=f"packed-{key}", desc="Packing")
        save_atomic(rows, pack_dir)
    efficiency = round(packing_efficiency(lengths, len(rows), L), 6)
    PREP_LOG.info("packed %d examples in %.1f s: %d rows of %d tokens, %.1f%% full", len(lengths),
                  time.perf_counter() - t0, len(rows), L, 100 * efficiency)
    return Packed(rows, efficiency, str(pack_dir))


def build_report(records: RecordSet, split: Split, tokenized: Tokenized, packed: Packed, audit, cfg: DataConfig,
                 fmt: ChatFormat, eval_packed: Packed | None = None) -> DataReport:
    """The ``DataReport`` of one ``prepare_data`` call."""
    c = tokenized.counts
    sources = {name: {**counts, "in_mix": split.in_mix.get(name, 0)} for name, counts in records.per_source.items()}
    evaluation = {"records": len(split.eval), "rows": len(eval_packed.rows) if eval_packed else 0,
                  "examples": sum(len(r) for r in eval_packed.rows["seq_lens"]) if eval_packed else 0}
    return DataReport(
        records=len(records.records), heldout=len(split.heldout), examples=len(tokenized.examples),
        dropped=dict(sorted((Counter(tokenized.dropped) + Counter(records.skipped)).items())),
        split_chunks=c["chunks"], rows=len(packed.rows), packing_efficiency=packed.efficiency,
        supervised_tokens=audit.supervised_tokens, role_markers_in_labels=audit.role_markers_in_labels,
        control_tokens_in_labels=audit.control_tokens_in_labels,
        turns_with_end_of_turn_trained=audit.turns_with_end_of_turn_trained, assistant_turns=c["assistant_turns"],
        max_seq_length=cfg.max_seq_length, chat_format=fmt.name,
        cache_files=[tokenized.cache_file, packed.cache_file], lines_read=records.lines_read,
        chats_with_guard=sum(n for a, n in split.preset_actions.items() if a in GUARDED_ACTIONS),
        preset_actions=split.preset_actions, chats_split_per_turn=c["per_turn"], render_mismatch=c["render_mismatch"],
        messages_with_control_text=c["control_text"], sources=sources, evaluation=evaluation,
    )


def record_key(record: ChatRecord | TextRecord) -> str:
    """Hash of a record after normalising whitespace (strip, runs of whitespace -> one space).

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
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


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


def _draw_heldout(records, n: int, seed: int) -> list[int]:
    if n == 0:
        return []
    chats = [i for i, r in enumerate(records) if isinstance(r, ChatRecord)]
    if n >= len(chats):
        raise InputError(f"data.eval_holdout={n} but there are only {len(chats)} chat records; lower it")
    return sorted(random.Random(seed).sample(chats, n))


_COLUMNS = ("input_ids", "labels", "length", "source", "drop_reason", "assistant_turns", "chunks", "per_turn",
            "render_mismatch", "control_text")
_COUNT_COLUMNS = ("assistant_turns", "chunks", "per_turn", "render_mismatch", "control_text")


def _tokenized_schema():
    """The tokenised dataset's columns (what ``datasets`` inferred when the batches were Python lists)."""
    import pyarrow as pa

    return pa.schema([("source", pa.string()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int64())),
                      ("length", pa.int64()), ("drop_reason", pa.string()), *((c, pa.int64()) for c in _COUNT_COLUMNS)])


_FORMATS: dict[str, ChatFormat] = {}  # cache key -> the format, for num_proc workers forked during tokenize_stage


def _workers_fork() -> bool:
    """Whether ``datasets.map(num_proc=...)`` starts its workers by fork (they then see ``_FORMATS``)."""
    import multiprocess

    return multiprocess.get_start_method() == "fork"


def _tokenize_batch(batch, fmt: ChatFormat | str, cfg: DataConfig):
    if isinstance(fmt, str):  # a worker forked by tokenize_stage: the parent's format, by its cache key
        fmt = _FORMATS[fmt]
    out: dict[str, list] = {k: [] for k in _COLUMNS}

    def emit(seg: Segment | None, source: str, reason: str = "", **counts):
        for k, v in (("input_ids", seg.input_ids if seg else ()), ("labels", seg.labels if seg else ()),
                     ("length", len(seg) if seg else 0), ("source", source), ("drop_reason", reason)):
            out[k].append(v)
        for k in _COUNT_COLUMNS:
            out[k].append(counts.get(k, 0))

    for messages, text, source, too_long in zip(batch["messages"], batch["text"], batch["source"], batch["too_long"]):
        if too_long >= 0:  # found certainly too long before tokenising (``_certainly_too_long``, overflow: drop)
            emit(None, source, "too_long", control_text=too_long)
            continue
        if not messages:
            _emit_text(emit, text, source, fmt, cfg)
            continue
        policy = "drop" if cfg.overflow == "auto" else cfg.overflow
        if policy == "split":
            raise InputError(f"{source}: data.overflow=split would cut a chat mid-answer; use drop or error for chats")
        msgs = json.loads(messages)
        try:
            if cfg.labels == "legacy_full_sequence":
                ids = tuple(fmt.encode_full(msgs))
                chat = EncodedChat((Segment(ids, ids),), turns_per_example=(_turns(msgs),))
            else:
                chat = fmt.encode_chat(msgs, example=source, max_length=cfg.max_seq_length)
        except LabelError as e:
            if cfg.on_error == "error":
                raise
            emit(None, source, e.reason)
            continue
        first = True
        for seg, turns in zip(chat.examples, chat.turns_per_example):
            head = dict(per_turn=int(chat.per_turn), render_mismatch=chat.render_mismatch,
                        control_text=chat.control_text_messages) if first else {}
            first = False
            if seg is None or len(seg) > cfg.max_seq_length:  # None: certainly too long, so never tokenised
                if policy == "error":
                    raise OverflowError_(f"{source}: example has {'more than' if seg is None else len(seg)} tokens > "
                                         f"data.max_seq_length={cfg.max_seq_length}; raise max_seq_length, or set "
                                         "data.overflow=drop (counted)")
                emit(None, source, "too_long", **head)
            elif seg.num_trained == 0:
                emit(None, source, "no_trained_tokens", **head)
            else:
                emit(seg, source, assistant_turns=turns, **head)
    import pyarrow as pa

    # an Arrow table (pyarrow converts the id tuples in C), not lists that datasets would scan and convert
    return pa.Table.from_pydict(out, schema=_tokenized_schema())


def _emit_text(emit, text: str, source: str, fmt: ChatFormat, cfg: DataConfig) -> None:
    """A ``{"text"}`` record: every token trained, EOS at the end (``fmt.encode_text``: control-token
    strings in the text stay text), under the overflow policy; a document certainly over
    ``max_seq_length`` (``fmt.min_tokens``) is dropped or refused without being tokenised."""
    eos = fmt.tokenizer.eos_token_id
    policy = "split" if cfg.overflow == "auto" else cfg.overflow
    if policy != "split" and fmt.min_tokens(text) + 1 > cfg.max_seq_length:
        seg = None
    else:
        ids = (*fmt.encode_text(text), eos)
        seg = Segment(ids, ids)
    if seg is not None and len(seg) <= cfg.max_seq_length:
        emit(seg, source)
    elif policy == "error":
        raise OverflowError_(f"{source}: example has {'more than' if seg is None else len(seg)} tokens > "
                             f"data.max_seq_length={cfg.max_seq_length}; raise max_seq_length, or set "
                             "data.overflow=drop (counted) or split (text only)")
    elif policy == "drop":
        emit(None, source, "too_long")
    else:
        for k, piece in enumerate(split_segment(seg, cfg.max_seq_length, eos if cfg.text_eos == "chunk" else None)):
            emit(piece, source, chunks=1 if k else 0)


_CHECK_CHARS = 1_000_000  # a record with more characters is checked for length before it is tokenised


def _certainly_too_long(record, fmt: ChatFormat, cfg: DataConfig) -> int | None:
    """For a record of more than ``_CHECK_CHARS`` characters under ``overflow: drop`` (or ``auto``
    for chats), the number of its messages that spell control tokens when it is certainly over
    ``max_seq_length`` (``ChatFormat.certainly_longer`` / ``min_tokens``, no tokenising), else
    None. Such a record is counted as ``too_long`` without its text ever being copied into the Arrow
    table or a tokenising worker: a 50 MB line costs one rendering of memory."""
    if cfg.labels != "assistant_only" or cfg.overflow not in ("auto", "drop"):
        return None
    if isinstance(record, TextRecord):
        if cfg.overflow == "auto" or len(record.text) <= _CHECK_CHARS:
            return None
        return 0 if fmt.min_tokens(record.text) + 1 > cfg.max_seq_length else None
    if sum(len(m.content) + len(m.reasoning or "") for m in record.messages) <= _CHECK_CHARS:
        return None
    msgs = record.as_dicts()
    if not fmt.certainly_longer(msgs, cfg.max_seq_length):
        return None
    return sum(fmt.spells_control_token(m["content"]) or fmt.spells_control_token(m.get("reasoning_content") or "")
               for m in msgs)


def _turns(msgs) -> int:
    return sum(m["role"] == "assistant" for m in msgs)


def _pack_batch(batch, kept):
    """The rows of a batch of bins: each row the concatenation of its members' ids and labels,
    gathered as Arrow arrays (no Python loop over tokens)."""
    import numpy as np
    import pyarrow as pa

    members = batch["members"]
    sub = kept.with_format("arrow")[[i for m in members for i in m]]  # the members, in row order
    per_row = np.fromiter((len(m) for m in members), dtype=np.int64, count=len(members))
    item_offsets = np.zeros(len(members) + 1, dtype=np.int64)
    np.cumsum(per_row, out=item_offsets[1:])
    lengths = sub.column("length").to_numpy()
    token_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=token_offsets[1:])
    row_offsets = pa.array(token_offsets[item_offsets], type=pa.int32())
    return pa.table({
        "input_ids": pa.ListArray.from_arrays(row_offsets, sub.column("input_ids").combine_chunks().flatten()),
        "labels": pa.ListArray.from_arrays(row_offsets, sub.column("labels").combine_chunks().flatten()),
        "seq_lens": pa.ListArray.from_arrays(pa.array(item_offsets, type=pa.int32()), pa.array(lengths, type=pa.int64())),
    })
