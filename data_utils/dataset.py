"""records -> tokenised segments -> packed rows, as cached ``datasets.Dataset`` objects.

Tokenising and packing show ``datasets`` progress bars and are cached as Arrow files under
``cache_dir``, keyed by a fingerprint of everything they depend on (file contents, tokenizer and
chat template, ``max_seq_length``, overflow policy, hold-out draw), so a second run loads them
instead of redoing the work. Nothing is lost silently: every dropped or split example is counted
in the ``DataReport``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_utils.audit import audit_rows
from data_utils.packing import best_fit_decreasing, packing_efficiency
from data_utils.records import RecordError, read_records
from data_utils.tokenize_chat import end_of_turn_id, tokenize_chat, tokenize_chat_full_sequence
from data_utils.tokenize_text import split_segment, tokenize_text
from data_utils.types import ChatRecord, Message, Segment, TextRecord
from presets import GUARDED_ACTIONS, apply_preset

logger = logging.getLogger(__name__)

PIPELINE_VERSION = "1"  # bump when tokenisation or packing output changes, to invalidate caches
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "packlora" / "datasets"


class OverflowError_(ValueError):
    """An example is longer than ``max_seq_length`` under ``overflow: error``."""


class NoExampleError(ValueError):
    """Every example was dropped or skipped; ``report`` holds the counts (a dict) for data_report.json."""

    def __init__(self, message: str, report: dict):
        self.report = report
        super().__init__(message)


@dataclass(frozen=True)
class DataReport:
    """What happened to the data (units in the field names' terms: records, examples, rows, tokens).

    ``lines_read`` counts the lines of the input files; ``records`` the valid, unique ones among
    them; ``examples`` the segments kept for training (a split text document counts once per chunk).
    ``dropped`` maps a reason to a count: a bad line skipped under ``data.on_error: skip`` (one of
    ``records.REASONS``), ``duplicate`` (a record equal to an earlier one after normalising
    whitespace), ``too_long`` (over ``max_seq_length`` under ``overflow: drop``), ``no_trained_tokens``.
    So ``lines_read = records + (line-level drops)`` and, for chats,
    ``records - heldout = examples + too_long + no_trained_tokens``.
    ``preset_actions`` counts what the preset did to each chat (``presets.PresetAction``: ``added``,
    ``guard_appended``, ``already_guarded``, ``kept_own``, ``replaced``), held-out chats included;
    ``chats_with_guard`` is how many of them end up with the preset's guard in their system message.
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
    turns_with_im_end_trained: int
    assistant_turns: int
    max_seq_length: int
    cache_files: list[str] = field(default_factory=list)
    lines_read: int = 0
    chats_with_guard: int = 0
    preset_actions: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class PreparedData:
    """Output of ``prepare_data``: packed training rows, held-out chats and the report."""

    rows: "object"  # datasets.Dataset with columns input_ids, labels, seq_lens
    heldout: list[ChatRecord]
    report: DataReport


def prepare_data(
    files: list[str],
    tokenizer,
    *,
    max_seq_length: int,
    format: str = "auto",
    overflow: str = "auto",
    eval_holdout: int = 0,
    seed: int = 42,
    cache_dir: str | Path | None = None,
    stage: str = "auto",
    text_eos: str = "document",
    preset=None,
    preset_overrides_system: bool = False,
    labels: str = "assistant_only",
    on_error: str = "error",
    packing: bool = True,
) -> PreparedData:
    """Read, tokenise (assistant-only labels), apply the overflow policy and pack.

    Args:
        files: JSONL paths (see ``records.read_records`` for formats).
        tokenizer: HF tokenizer with a chat template (for chats).
        max_seq_length: row length in tokens.
        format: record format or ``auto``.
        overflow: ``drop``, ``error``, ``split`` (text only) or ``auto`` (chats ``drop``, text ``split``).
        eval_holdout: number of chat records held out of training, drawn with ``seed``.
        seed: seed for the hold-out draw.
        cache_dir: Arrow cache directory (default ``~/.cache/packlora/datasets``).
        stage: ``pretrain`` (text records only), ``sft`` (chats only) or ``auto`` (any mix).
        text_eos: ``document`` (EOS only at a document's true end) or ``chunk`` (every split chunk).
        preset: a ``presets.Preset`` whose system message goes into chats without one (all of
            them with ``preset_overrides_system``); held-out chats get it too.
        labels: ``assistant_only``, or ``legacy_full_sequence`` (bug reproduction: chats are
            labelled in full, role markers included; see ``data.labels`` in training/config.py).
        on_error: ``error`` stops at the first bad or duplicate record; ``skip`` leaves it out and
            counts it in ``report.dropped`` by reason.
        packing: ``False`` puts every example in a row of its own (an unpacked baseline).

    Raises:
        RecordError: a malformed or duplicate line under ``on_error="error"`` (file:line in the message).
        TemplateMismatchError: labels cannot be placed exactly for an example.
        OverflowError_: an over-long example under ``overflow: error``.
        NoExampleError: no example left (every record was bad, a duplicate, too long or untrained).
        ValueError: ``split`` asked for chats or too few records for the hold-out.
    """
    import datasets

    records: list[ChatRecord | TextRecord] = []
    skipped: list[RecordError] = []
    for f in files:
        records.extend(read_records(f, format, on_error, skipped))
    records, duplicates = _drop_duplicates(records, on_error)
    skipped += duplicates
    line_drops = Counter(e.reason for e in skipped)
    for e in skipped[:5]:
        logger.warning("skipped (data.on_error=skip): %s", e)
    lines_read = len(records) + len(skipped)
    if not records:
        raise NoExampleError(
            f"no example left to train on: {dict(sorted(line_drops.items()))} dropped of {lines_read} lines in "
            f"{files}. Every line was skipped; set data.on_error=error to stop at the first bad line and see why",
            {"lines_read": lines_read, "records": 0, "examples": 0, "dropped": dict(sorted(line_drops.items()))},
        )
    records, preset_actions = _apply_stage_and_preset(records, stage, preset, preset_overrides_system)
    heldout_idx = _draw_heldout(records, eval_holdout, seed)
    heldout = [records[i] for i in heldout_idx]
    held = set(heldout_idx)
    train_records = [r for i, r in enumerate(records) if i not in held]

    cache = Path(cache_dir or DEFAULT_CACHE_DIR)
    cache.mkdir(parents=True, exist_ok=True)
    fp = _fingerprint(files, tokenizer, max_seq_length, format, overflow, heldout_idx)
    if (stage, text_eos, preset, preset_overrides_system) != ("auto", "document", None, False):  # defaults keep caches
        fp = hashlib.sha256(f"{fp}-{stage}-{text_eos}-{preset!r}-{preset_overrides_system}".encode()).hexdigest()[:16]
    if labels != "assistant_only":  # keep assistant_only fingerprints (and caches) unchanged
        fp = hashlib.sha256(f"{fp}-{labels}".encode()).hexdigest()[:16]
    eot = end_of_turn_id(tokenizer)
    raw = datasets.Dataset.from_dict(
        {
            "messages": [json.dumps(r.as_dicts(), ensure_ascii=False) if isinstance(r, ChatRecord) else "" for r in train_records],
            "text": [r.text if isinstance(r, TextRecord) else "" for r in train_records],
            "source": [str(r.source) for r in train_records],
        }
    )
    tok_file = cache / f"tokenized-{fp}.arrow"
    tokenized = raw.map(
        _tokenize_batch,
        batched=True,
        remove_columns=raw.column_names,
        fn_kwargs=dict(tokenizer=tokenizer, eot=eot, max_seq_length=max_seq_length, overflow=overflow, labels=labels, text_eos=text_eos),
        cache_file_name=str(tok_file),
        new_fingerprint=f"tok-{fp}",
        desc="Tokenising",
    )
    drop_reasons = list(tokenized["drop_reason"])
    reasons = Counter(drop_reasons)
    kept_idx = [i for i, r in enumerate(drop_reasons) if r == ""]
    if not kept_idx:
        all_drops = dict(sorted((Counter({k: v for k, v in reasons.items() if k}) + line_drops).items()))
        raise NoExampleError(
            f"no example left to train on: {dict(reasons)} dropped of {len(train_records)} records in {files}. "
            f"Check data.max_seq_length ({max_seq_length}), data.overflow and the data",
            {"lines_read": lines_read, "records": len(records), "examples": 0, "dropped": all_drops},
        )
    kept = tokenized.select(kept_idx)
    lengths = list(kept["length"])
    bins = best_fit_decreasing(lengths, max_seq_length) if packing else [[i] for i in range(len(lengths))]
    pack_file = cache / (f"packed-{fp}.arrow" if packing else f"unpacked-{fp}.arrow")
    packed = datasets.Dataset.from_dict({"members": bins}).map(
        _pack_batch,
        batched=True,
        remove_columns=["members"],
        fn_kwargs=dict(kept=kept),
        cache_file_name=str(pack_file),
        new_fingerprint=f"pack-{fp}" if packing else f"unpack-{fp}",
        desc="Packing",
    )
    audit = audit_rows(packed, tokenizer, eot, _pad_id(tokenizer))
    split_chunks = sum(kept["chunks"])
    report = DataReport(
        records=len(records),
        heldout=len(heldout),
        examples=len(kept),
        dropped=dict(sorted((Counter({k: v for k, v in reasons.items() if k}) + line_drops).items())),
        split_chunks=split_chunks,
        rows=len(packed),
        packing_efficiency=round(packing_efficiency(lengths, len(packed), max_seq_length), 6),
        supervised_tokens=audit.supervised_tokens,
        role_markers_in_labels=audit.role_markers_in_labels,
        turns_with_im_end_trained=audit.turns_with_im_end_trained,
        assistant_turns=sum(kept["assistant_turns"]),
        max_seq_length=max_seq_length,
        cache_files=[str(tok_file), str(pack_file)],
        lines_read=lines_read,
        chats_with_guard=sum(n for a, n in preset_actions.items() if a in GUARDED_ACTIONS),
        preset_actions=dict(sorted(preset_actions.items())),
    )
    for reason, n in report.dropped.items():
        hint = "data.on_error" if reason in line_drops else "data.overflow / data.max_seq_length"
        logger.warning("dropped %d example(s): %s (see %s)", n, reason, hint)
    return PreparedData(rows=packed, heldout=heldout, report=report)


def record_key(record: ChatRecord | TextRecord) -> str:
    """Hash of a record after normalising whitespace (strip, runs of whitespace -> one space).

    >>> from data_utils.types import Message, Source
    >>> a = ChatRecord((Message("user", "Hi  there"), Message("assistant", "Yes.")), Source("a", 1))
    >>> b = ChatRecord((Message("user", " Hi there"), Message("assistant", "Yes.\\n")), Source("a", 2))
    >>> record_key(a) == record_key(b), record_key(a) == record_key(TextRecord("Hi there Yes.", Source("a", 3)))
    (True, False)
    """
    norm = lambda t: " ".join(t.split())  # noqa: E731
    if isinstance(record, ChatRecord):
        payload = [[m.role, norm(m.content)] for m in record.messages]
    else:
        payload = norm(record.text)
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def _drop_duplicates(records, on_error: str):
    """Keep the first of each set of equal records; the others are errors (or, under skip, returned)."""
    first: dict[str, ChatRecord | TextRecord] = {}
    kept, dups = [], []
    for r in records:
        key = record_key(r)
        if key in first:
            err = RecordError(
                r.source,
                f"duplicate record: same content as {first[key].source} (after normalising whitespace); "
                "remove one copy, or set data.on_error=skip to drop it (counted as 'duplicate')",
                "duplicate",
            )
            if on_error == "error":
                raise err
            dups.append(err)
        else:
            first[key] = r
            kept.append(r)
    return kept, dups


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _apply_stage_and_preset(records, stage: str, preset, override: bool):
    """Refuse records of the wrong kind for ``stage``; apply the preset to every chat.

    Returns ``(records, actions)``: ``actions`` counts ``presets.PresetAction`` per chat (empty
    without a preset), and is logged as what really happened.
    """
    wrong = {"pretrain": ChatRecord, "sft": TextRecord}.get(stage)
    for r in records:
        if wrong is not None and isinstance(r, wrong):
            kind = "a chat" if wrong is ChatRecord else "a {'text'} record"
            raise ValueError(
                f"{r.source}: {kind} under data.stage={stage}; stage 1 (pretrain) trains on {{'text'}} records, "
                "stage 2 (sft) on chats. Fix data.train or set data.stage: auto"
            )
    if preset is None:
        return records, Counter()
    actions: Counter = Counter()
    out = []
    for r in records:
        if isinstance(r, ChatRecord):
            messages, action = apply_preset(r.as_dicts(), preset, override)
            actions[action] += 1
            r = ChatRecord(tuple(Message(m["role"], m["content"]) for m in messages), r.source)
        out.append(r)
    logger.info(
        "preset %s: %d of %d chats now carry its guard (%s); chats with a system message of their own keep it "
        "unless preset_overrides_system is true", preset.name, sum(n for a, n in actions.items() if a in GUARDED_ACTIONS),
        sum(actions.values()), ", ".join(f"{a}: {n}" for a, n in sorted(actions.items())) or "no chats",
    )
    return out, actions


def _draw_heldout(records, n: int, seed: int) -> list[int]:
    if n == 0:
        return []
    chats = [i for i, r in enumerate(records) if isinstance(r, ChatRecord)]
    if n >= len(chats):
        raise ValueError(f"data.eval_holdout={n} but there are only {len(chats)} chat records; lower it")
    return sorted(random.Random(seed).sample(chats, n))


def _tokenize_batch(batch, tokenizer, eot, max_seq_length, overflow, labels="assistant_only", text_eos="document"):
    out = {k: [] for k in ("input_ids", "labels", "length", "source", "drop_reason", "assistant_turns", "chunks")}

    def emit(seg: Segment | None, source, reason, turns, chunks):
        out["input_ids"].append(list(seg.input_ids) if seg else [])
        out["labels"].append(list(seg.labels) if seg else [])
        out["length"].append(len(seg) if seg else 0)
        out["source"].append(source)
        out["drop_reason"].append(reason)
        out["assistant_turns"].append(turns)
        out["chunks"].append(chunks)

    for messages, text, source in zip(batch["messages"], batch["text"], batch["source"]):
        if messages:
            msgs = json.loads(messages)
            if labels == "legacy_full_sequence":
                seg = tokenize_chat_full_sequence(msgs, tokenizer)
            else:
                seg = tokenize_chat(msgs, tokenizer, eot, example=source)
            turns = sum(m["role"] == "assistant" for m in msgs)
            policy = "drop" if overflow == "auto" else overflow
            if policy == "split":
                raise ValueError(
                    f"{source}: data.overflow=split would cut a chat mid-answer; use drop or error for chats"
                )
        else:
            seg = tokenize_text(text, tokenizer, tokenizer.eos_token_id)
            turns = 0
            policy = "split" if overflow == "auto" else overflow
        if len(seg) > max_seq_length:
            if policy == "error":
                raise OverflowError_(
                    f"{source}: example has {len(seg)} tokens > data.max_seq_length={max_seq_length}; "
                    "raise max_seq_length, or set data.overflow=drop (counted) or split (text only)"
                )
            if policy == "drop":
                emit(None, source, "too_long", 0, 0)
                continue
            pieces = split_segment(seg, max_seq_length, tokenizer.eos_token_id if text_eos == "chunk" else None)
            for k, piece in enumerate(pieces):
                emit(piece, source, "", 0, 1 if k else 0)
            continue
        if seg.num_trained == 0:
            emit(None, source, "no_trained_tokens", 0, 0)
            continue
        emit(seg, source, "", turns, 0)
    return out


def _pack_batch(batch, kept):
    flat = [i for members in batch["members"] for i in members]
    sub = kept.select(flat)
    ids, labels, lens = sub["input_ids"], sub["labels"], sub["length"]
    out = {"input_ids": [], "labels": [], "seq_lens": []}
    k = 0
    for members in batch["members"]:
        m = len(members)
        out["input_ids"].append([t for seq in ids[k : k + m] for t in seq])
        out["labels"].append([t for seq in labels[k : k + m] for t in seq])
        out["seq_lens"].append(list(lens[k : k + m]))
        k += m
    return out


def _fingerprint(files, tokenizer, max_seq_length, format, overflow, heldout_idx) -> str:
    h = hashlib.sha256()
    h.update(PIPELINE_VERSION.encode())
    for f in files:
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
    h.update(tokenizer.backend_tokenizer.to_str().encode() if hasattr(tokenizer, "backend_tokenizer") else repr(tokenizer).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps([max_seq_length, format, overflow, heldout_idx, tokenizer.eos_token_id]).encode())
    return h.hexdigest()[:16]
