"""The data cache: what prepared data depends on (``CacheKey``), the sources' content digests, and
atomic writes under ``data.cache_dir``.

A run's key is computed from the sources' bytes and the settings alone, before any record is
parsed, so a run whose data is already prepared loads it (``load_prepared``) without reading a
record: every training process, ``packlora inspect`` and the launcher's pre-flight
(``records_checked``). A file's digest is remembered under ``cache_dir/digests`` with its size,
modification and change times and inode, and read again only when one of those changed (the
shortcut git's index takes), so a 10 GB corpus is hashed once, not at every start.

Layout of ``cache_dir``::

    digests/PATHHASH.json       a file's sha256, with the size, mtime and inode it was taken at
    records-KEY.json            the records of these sources were read without error (pre-flight)
    tokenized-KEY/, packed-KEY/ Arrow datasets (``save_to_disk``), written atomically
    prepared-KEY.json           the report, held-out chats and row directories of one prepared run
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PIPELINE_VERSION = "2"  # bump when tokenisation or packing output changes, to invalidate caches
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "packlora" / "datasets"


@dataclass(frozen=True)
class CacheKey:
    """Everything the prepared data depends on, hashed once (``digest``): the sources (contents and
    specs), the tokenizer and template, the chat format, the ``data:`` settings that change a token
    or a draw (``eval_holdout``, ``eval_split``, weights), the preset and the seed. Not ``num_proc``
    nor ``cache_dir``: they change no token. Built without parsing a record (``prepare_data``)."""

    pipeline_version: str
    sources: tuple[str, ...]
    tokenizer: str
    chat_format: tuple
    data: tuple
    preset: str
    seed: int

    def digest(self, part: str = "train") -> str:
        """16 hex digits; ``part`` (``train``, ``eval``) names one of the key's datasets."""
        return hashlib.sha256(json.dumps([asdict(self), part], sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: str | Path, memo_dir: Path | None = None) -> bytes:
    """sha256 of a file's bytes (streamed in blocks). With ``memo_dir``, remembered there with the
    file's size, ``st_mtime_ns``, ``st_ctime_ns`` and inode, and reused while all four are unchanged
    (a write changes the ctime even when a tool then sets the mtime back).

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); (d / "a.jsonl").write_text("x\\n")
    2
    >>> file_digest(d / "a.jsonl", d / "memo") == hashlib.sha256(b"x\\n").digest() == file_digest(d / "a.jsonl", d / "memo")
    True
    """
    path = Path(path)
    if memo_dir is None:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").digest()
    st = path.stat()
    stamp = [str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    memo = memo_dir / f"{hashlib.sha256(stamp[0].encode()).hexdigest()[:32]}.json"
    try:
        saved = json.loads(memo.read_text())
        if saved["stamp"] == stamp:
            return bytes.fromhex(saved["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no memo yet, or an unreadable one: hash the file
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").digest()
        after = os.fstat(f.fileno())
    if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) == tuple(stamp[1:4]):  # not remembered mid-write
        write_json_atomic({"stamp": stamp, "sha256": digest.hex()}, memo)
    return digest


def tokenizer_digest(tokenizer) -> str:
    """16 hex digits of the tokenizer's vocabulary and rules, chat template, EOS and pad ids."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(tokenizer).encode())
    h.update(str(tokenizer.chat_template).encode())
    h.update(json.dumps([tokenizer.eos_token_id, tokenizer.pad_token_id]).encode())
    return h.hexdigest()[:16]


def records_key(source_digests, format: str, on_error: str) -> str:
    """Key of a read of these sources (their digests) under ``format`` and ``on_error``."""
    payload = [PIPELINE_VERSION, list(source_digests), format, on_error]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def save_atomic(ds, path: Path) -> None:
    """Write the ``datasets.Dataset`` ``ds`` to ``path`` atomically (a temporary directory renamed),
    for later runs to load; when another process got there first, its copy stays."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        ds.save_to_disk(str(tmp))
        os.replace(tmp, path)
    except OSError:
        if not (path / "state.json").is_file():  # not another process that got there first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(obj, path: Path) -> None:
    """``obj`` as JSON in ``path``, written to a temporary file and renamed: a reader sees all or nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_json(path: Path):
    """The JSON in ``path``, or None when it is missing or unreadable (a cache miss, not an error)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def dataset_saved(path: str | Path) -> bool:
    """Whether ``path`` holds a dataset written by ``save_atomic``."""
    return (Path(path) / "state.json").is_file()
