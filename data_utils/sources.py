"""Where records come from: files of any format, saved datasets and dataset names, mixed by weight.

Each entry of ``data.train`` (and ``data.eval``) is a path, or a mapping::

    data:
      train:
        - ../shared/data/shishuo/stage2_rewrite.jsonl            # JSONL: packlora's own reader
        - {path: chats.parquet, weight: 2}                          # Parquet, every record twice
        - {path: exported/, max_records: 500}                       # a datasets.save_to_disk directory
        - {path: my-org/chats, split: train, columns: {messages: conversation}, weight: 0.5}   # a dataset name
        - {path: export.json, field: data}                          # {"data": [record, ...]}

============== =========================================================================================
path           how it is read
============== =========================================================================================
``*.jsonl``    packlora's reader: every bad line is an error naming ``file:line``, the field and the fix
``*.json``     ``datasets.load_dataset("json")`` (a JSON array or JSON lines; records under one key of a JSON
               object, ``{"data": [...]}``, with ``field: data``)
``*.parquet``  ``datasets.load_dataset("parquet")``
``*.csv``      ``datasets.load_dataset("csv")`` (a list-valued column, e.g. ``messages``, as a JSON string)
a directory    ``datasets.load_from_disk`` (written by ``Dataset.save_to_disk``; ``split`` picks from a
               ``DatasetDict``)
anything else  ``datasets.load_dataset(path, split=split)`` (a dataset name on the Hub or a loading script)
============== =========================================================================================

Rows read through ``datasets`` are validated exactly like JSONL lines (``records.parse_record``);
an error names the source and the 1-based row, e.g. ``chats.parquet[train]:12``.

``columns`` maps packlora's field names (``messages``, ``conversations``, ``instruction``, ``input``,
``output``, ``system``, ``text``) to the source's column names. ``max_records`` keeps the first N
valid records of the source. ``weight`` scales the source's share of the training mix after
duplicates and held-out records are removed: ``2`` puts every record in twice, ``0.5`` keeps a
seeded half, ``1.5`` all of them plus a seeded half again (``mix``). Mixing is reproducible: the
same sources, weights and seed give the same records in the same order.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packlora.core.config import did_you_mean
from packlora.core.errors import InputError
from packlora.data_utils.records import DataFileError, RecordError, data_file_error, iter_records, parse_record
from packlora.data_utils.types import ChatRecord, Source, TextRecord

FIELDS = ("messages", "conversations", "instruction", "input", "output", "system", "text")
_LOADERS = {".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """One data source (see the module docstring).

    Attributes:
        path: a file, a ``save_to_disk`` directory or a dataset name.
        format: the record format (``auto``, ``messages``, ...); None: ``data.format``.
        split: the split of a dataset name or ``DatasetDict`` (default ``train``).
        columns: packlora field name -> the source's column name.
        weight: share of the training mix, a multiplier on the source's record count (> 0).
        max_records: keep only the first this many valid records.
        field: a ``.json`` file that is one object holding its records in a list under this key
            (``{"data": [...]}``: ``field: data``), as ``datasets.load_dataset("json", field=...)`` reads it.
    """

    path: str
    format: str | None = None
    split: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    weight: float = 1.0
    max_records: int | None = None
    field: str | None = None

    @property
    def name(self) -> str:
        """How reports and errors name the source: the path, with the split if one was chosen."""
        return f"{self.path}[{self.split}]" if self.split else self.path

    @property
    def kind(self) -> str:
        """``jsonl``, ``json``, ``parquet``, ``csv``, ``disk`` (a directory) or ``name``."""
        p = Path(self.path)
        if p.suffix == ".jsonl":
            return "jsonl"
        if p.suffix in _LOADERS:
            return _LOADERS[p.suffix]
        return "disk" if p.is_dir() else "name"

    def problems(self, key: str) -> list[str]:
        """What is wrong with this spec, each problem starting with ``key`` (no file-system access)."""
        p = []
        if not isinstance(self.path, str) or not self.path:
            p.append(f"{key}.path: must be a non-empty string, got {self.path!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not self.weight > 0:
            p.append(f"{key}.weight: must be a number > 0, got {self.weight!r}")
        if self.max_records is not None and (isinstance(self.max_records, bool) or not isinstance(self.max_records, int)
                                             or self.max_records < 1):
            p.append(f"{key}.max_records: must be an integer >= 1, got {self.max_records!r}")
        if not isinstance(self.columns, dict) or not all(isinstance(v, str) for v in self.columns.values()):
            p.append(f"{key}.columns: must map field names to column names, got {self.columns!r}")
        else:
            p += [f"{key}.columns: {k!r} is not a record field; use one of {list(FIELDS)}" for k in self.columns
                  if k not in FIELDS]
        if self.field is not None and (not isinstance(self.field, str) or not self.field):
            p.append(f"{key}.field: must be the key the records sit under, e.g. data, got {self.field!r}")
        elif self.field is not None and isinstance(self.path, str) and Path(self.path).suffix != ".json":
            p.append(f"{key}.field: only read for a .json file (records under one key), got path {self.path!r}")
        return p

    def missing(self, key: str) -> list[str]:
        """``[f"{key}: {problem}"]`` when ``disk_error`` finds one, else ``[]``."""
        err = self.disk_error()
        return [f"{key}: {err}"] if err is not None else []

    def disk_error(self) -> DataFileError | None:
        """Why a local source cannot be read: a file source that does not exist, is a directory, a FIFO
        or device, cannot be opened or is compressed (``records.data_file_error``), or a directory that
        ``Dataset.save_to_disk`` did not write; None when it can (a dataset name is checked when read)."""
        kind = self.kind
        if kind in ("jsonl", *_LOADERS.values()):
            return data_file_error(self.path)
        if kind == "disk" and not any((Path(self.path) / f).is_file() for f in ("state.json", "dataset_dict.json")):
            return DataFileError(self.path, "is a directory but not a saved dataset (no state.json or dataset_dict.json, "
                                 "as Dataset.save_to_disk writes); give a .jsonl file or a save_to_disk directory",
                                 "is_directory")
        return None

    def digest(self, memo_dir: Path | None = None) -> str:
        """sha256 of what this source reads: the file, the directory's files, or the dataset's
        fingerprint. ``memo_dir``: remember each file's digest there (``cache.file_digest``)."""
        from packlora.data_utils.cache import file_digest

        h = hashlib.sha256(json.dumps([self.path, self.format, self.split, self.columns, self.max_records]
                                      + ([self.field] if self.field else [])).encode())
        p = Path(self.path)
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        for f in files:
            h.update(file_digest(f, memo_dir))
        if self.kind == "name":
            h.update(getattr(self._load(), "_fingerprint", "").encode())
        return h.hexdigest()

    def _load(self):
        import datasets

        kind = self.kind
        if kind == "disk":
            ds = datasets.load_from_disk(self.path)
            if isinstance(ds, datasets.DatasetDict):
                split = self.split or "train"
                if split not in ds:
                    raise InputError(f"{self.path}: no split {split!r}; it has {sorted(ds)} (set split:)")
                ds = ds[split]
            return ds
        if kind == "name":
            return datasets.load_dataset(self.path, split=self.split or "train")
        builder = "json" if kind == "jsonl" else kind
        extra = {"field": self.field} if self.field else {}
        return datasets.load_dataset(builder, data_files=self.path, split=self.split or "train", **extra)


def parse_source(entry: Any) -> SourceSpec:
    """A ``data.train`` / ``data.eval`` entry (a path or a mapping) as a ``SourceSpec``.

    Raises:
        TypeError: a mapping with unknown keys, or neither a string nor a mapping.
    """
    if isinstance(entry, str):
        return SourceSpec(entry)
    if isinstance(entry, SourceSpec):
        return entry
    if isinstance(entry, Mapping):
        keys = ("path", "format", "split", "columns", "weight", "max_records", "field")
        unknown = sorted(set(entry) - set(keys))
        if unknown:
            hints = "".join(did_you_mean(k, keys) for k in unknown)
            raise TypeError(f"unknown keys {unknown}{hints}; a source takes {', '.join(keys)}")
        return SourceSpec(**{**entry, "columns": dict(entry.get("columns") or {})})
    raise TypeError(f"must be a path or a mapping with a path, got {type(entry).__name__}")


def iter_source(spec: SourceSpec, format: str = "auto", on_error: str = "error",
                skipped: list[RecordError] | None = None) -> Iterator[ChatRecord | TextRecord]:
    """The valid records of one source, in order (see ``records.iter_records`` for the errors)."""
    fmt = spec.format or format
    if spec.kind == "jsonl" and not spec.columns:
        records: Iterator = iter_records(spec.path, fmt, on_error, skipped)
    else:
        records = _iter_dataset(spec, fmt, on_error, skipped)
    for n, record in enumerate(records):
        if spec.max_records is not None and n >= spec.max_records:
            return
        yield record


def _iter_dataset(spec: SourceSpec, fmt: str, on_error: str, skipped) -> Iterator[ChatRecord | TextRecord]:
    err = spec.disk_error()
    if err is not None:
        raise err
    ds = spec._load()  # a JSONL file with renamed columns too, through datasets' json loader
    wanted = {f: spec.columns.get(f, f) for f in FIELDS}
    missing = [c for f, c in spec.columns.items() if c not in ds.column_names]
    if missing:
        raise InputError(f"{spec.name}: columns {missing} (from columns:) are not in the dataset; it has "
                         f"{ds.column_names}")
    if not set(wanted.values()) & set(ds.column_names):
        key = _records_under_one_key(ds)
        if key is not None:
            raise InputError(
                f"{spec.name}: its records sit under the key {key!r} (one JSON object holding a list of records); "
                f"read them with the source option field: {key}, e.g. data.train: [{{path: {spec.path}, field: {key}}}]"
            )
        raise InputError(f"{spec.name}: none of its columns {ds.column_names} is a record field {list(FIELDS)}; map "
                         f"one with columns:, e.g. {{path: {spec.path}, columns: {{messages: {ds.column_names[0]}}}}}")
    for i, row in enumerate(ds):
        src = Source(spec.name, i + 1)
        obj = {f: _decode_json(row[c]) for f, c in wanted.items() if c in row and row[c] is not None}
        try:
            yield parse_record(obj, src, fmt)
        except RecordError as err:
            if on_error == "error":
                raise
            if skipped is not None:
                skipped.append(err)


def _records_under_one_key(ds) -> str | None:
    """The key of a JSON file that is one object holding a list of records (``{"data": [{...}, ...]}``),
    which ``datasets`` reads as one row with one list column; else None."""
    if len(ds.column_names) != 1 or len(ds) == 0:
        return None
    value = ds[0][ds.column_names[0]]
    return ds.column_names[0] if isinstance(value, list) and value and isinstance(value[0], dict) else None


def _decode_json(value):
    """A list or object stored as a JSON string (CSV has no nested columns); the string itself when it
    is not valid JSON (the record's validation then names the field)."""
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return value
    return value


def mix(records_by_source: list[tuple[SourceSpec, list]], seed: int) -> tuple[list, dict[str, int]]:
    """The weighted training mix: each source's records ``floor(weight)`` times, plus a seeded sample
    of ``round(frac(weight) * n)`` of them; sources in order, each in its own order.

    Returns:
        ``(records, in_mix)``: the mixed records and how many each source contributed.

    >>> specs = [(SourceSpec("a", weight=2), ["a1", "a2"]), (SourceSpec("b", weight=0.5), ["b1", "b2", "b3", "b4"])]
    >>> out, counts = mix(specs, seed=0)
    >>> counts, out[:4]
    ({'a': 4, 'b': 2}, ['a1', 'a2', 'a1', 'a2'])
    """
    out, counts = [], {}
    rng = random.Random(seed)
    for spec, records in records_by_source:
        whole, frac = divmod(float(spec.weight), 1.0)
        picked = list(records) * int(whole)
        extra = round(frac * len(records))
        if extra:
            picked += [records[i] for i in sorted(rng.sample(range(len(records)), extra))]
        out += picked
        counts[spec.name] = counts.get(spec.name, 0) + len(picked)
    return out, counts

