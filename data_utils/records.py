"""Read JSONL files into validated records (``ChatRecord`` or ``TextRecord``).

Supported line formats (``format=``):

* ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``; an
  assistant message may carry ``"reasoning_content": str`` (rendered by templates that show
  reasoning, such as Qwen3's; a reply written as ``<think>…</think>…`` works too)
* ``sharegpt``: ``{"conversations": [{"from": "system"|"human"|"user"|"gpt"|"assistant", "value": str}, ...]}``
* ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str, "system": str (optional)}``
* ``text``: ``{"text": str}`` (raw text for continued pre-training)
* ``auto``: pick one of the above per line from its keys.

Extra keys (``source``, ``id``...) are ignored. A UTF-8 byte-order mark at the start of a file and
CRLF line endings are read as the text they frame. Every problem raises ``RecordError`` naming the
file, the 1-based line number, the field and the fix; ``err.reason`` is a short slug (one of
``REASONS``) used to count it. With ``on_error="skip"`` a bad line is not raised but counted:
``read_records(path, on_error="skip", skipped=errors)`` appends each ``RecordError`` to ``errors``.

Beyond the format, a chat must have: an optional system message in first position only,
at least one assistant turn, non-empty assistant content, and no two consecutive turns of the
same role. ChatML itself would render two user turns in a row, but most chat templates (Llama-2,
Mistral, Gemma) refuse them and such a record is almost always a conversion bug; merge the turns.

Example::

    >>> import json, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "chats.jsonl")
    >>> with open(p, "w") as f:
    ...     _ = f.write(json.dumps({"conversations": [{"from": "human", "value": "Hi"},
    ...                                              {"from": "gpt", "value": "Hello."}]}) + "\\n")
    >>> [r.as_dicts() for r in read_records(p)]
    [[{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello.'}]]
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import re
import stat
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator, get_args

from packlora.core.errors import InputError, MissingPathError, PathError
from packlora.data_utils.types import ROLES, ChatRecord, Message, OnError, RecordFormat, Source, TextRecord

FORMATS = get_args(RecordFormat)
_BOM = b"\xef\xbb\xbf"
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


REASONS = (
    "not_utf8", "blank_line", "invalid_json", "nested_too_deep", "not_an_object", "unknown_format", "bad_field",
    "unknown_role", "content_not_string", "no_messages", "no_assistant_turn", "empty_assistant_turn",
    "consecutive_same_role", "system_not_first", "empty_text", "invalid_unicode",
)  # fmt: skip
"""Slugs of ``RecordError.reason``; the data report counts skipped lines by these (plus ``duplicate``)."""
PROMPT_REASONS = ("text_record", "lone_assistant_turn")
"""The further ``RecordError.reason`` slugs of a prompt file (``packlora decode --input``)."""
FILE_REASONS = ("not_found", "is_directory", "not_a_regular_file", "unreadable", "compressed", "changed_while_read")
"""Slugs of ``DataFileError.reason``: a whole file that cannot be read as JSONL (never skipped)."""
ON_ERROR = get_args(OnError)
# the first bytes of compressed files (gzip, bzip2, xz, zstd, zip) that some tools name .jsonl: whole
# headers (a JSONL line that merely starts with "BZh" is a bad line, not a bzip2 file)
_COMPRESSED = ((re.compile(rb"\x1f\x8b\x08"), "gzip", "gunzip -k"),
               (re.compile(rb"BZh[1-9](1AY&SY|\x17rE8P\x90)"), "bzip2", "bunzip2 -k"),
               (re.compile(rb"\xfd7zXZ\x00[\x00\x01\x04\x0a]"), "xz", "unxz -k"), (re.compile(rb"\x28\xb5\x2f\xfd"), "zstd", "unzstd"),
               (re.compile(rb"PK\x03\x04"), "zip", "unzip"))


class RecordError(InputError):
    """A malformed input line. ``str(err)`` starts with ``path:line:``.

    Attributes:
        source: file and 1-based line.
        problem: what is wrong and how to fix it (starts with the field at fault, if any).
        reason: a slug from ``REASONS`` or ``PROMPT_REASONS`` (``duplicate`` for a repeated record).
    """

    def __init__(self, source: Source, problem: str, reason: str = "invalid"):
        self.source = source
        self.problem = problem
        self.reason = reason
        super().__init__(f"{source}: {problem}")

    def __reduce__(self):  # rebuilt from its fields when a worker process sends it back
        return type(self), (self.source, self.problem, self.reason)


class DataFileError(PathError):
    """A data file that cannot be read as JSONL at all: missing, a directory, a FIFO or device, unreadable,
    compressed, or changed while it was read. ``str(err)`` is one line, ``PATH: problem and fix``.

    Attributes:
        path: the file.
        reason: a slug from ``FILE_REASONS``.
    """

    def __init__(self, path: str | Path, problem: str, reason: str):
        self.path = str(path)
        self.problem = problem
        self.reason = reason
        super().__init__(f"{path}: {problem}")

    def __reduce__(self):
        return type(self), (self.path, self.problem, self.reason)

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


class MissingDataFileError(DataFileError, MissingPathError):
    """A data file that does not exist (also a ``FileNotFoundError``)."""


def data_file_error(path: str | Path, what: str = "data file") -> DataFileError | None:
    """Why ``path`` cannot be read as a JSONL file, or None when it can: it does not exist, is a
    directory, is not a regular file (a FIFO, socket or device, which would block or never end),
    cannot be opened, or starts like a compressed file. Opens nothing but a regular file.

    >>> import tempfile
    >>> str(data_file_error(tempfile.gettempdir()))  # doctest: +ELLIPSIS
    '...: is a directory, not a JSONL data file; give the file itself'
    """
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return MissingDataFileError(path, f"{what} does not exist (paths are relative to {Path.cwd()})", "not_found")
    except OSError as e:
        return DataFileError(path, f"cannot be read ({e.strerror})", "unreadable")
    if stat.S_ISDIR(mode):
        return DataFileError(path, "is a directory, not a JSONL data file; give the file itself", "is_directory")
    if not stat.S_ISREG(mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
                else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
        return DataFileError(path, f"is {kind}, not a regular file; packlora reads a data file more than once (to "
                             "hash it for the cache, then its records), so write the data to a file first",
                             "not_a_regular_file")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        return DataFileError(path, f"cannot be read ({e.strerror}); check its permissions", "unreadable")
    for magic, name, command in _COMPRESSED:
        if magic.match(head):
            return DataFileError(path, f"is {name}-compressed, not JSONL text; decompress it first "
                                 f"({command} {path}) and give the .jsonl it writes", "compressed")
    return None


class SkipLog:
    """The lines left out under ``on_error: skip``, counted by source and reason, the first ``keep`` of
    them kept whole (for the log). Memory does not grow with the number of bad lines.

    ``append(err)`` takes a ``RecordError``, like the plain list that ``read_records`` also accepts.

    >>> log = SkipLog(keep=1)
    >>> for n in (1, 2):
    ...     log.append(RecordError(Source("a.jsonl", n), "blank line", "blank_line"))
    >>> len(log), log.by_reason(), log.for_source("a.jsonl"), [str(e.source) for e in log.first]
    (2, {'blank_line': 2}, {'blank_line': 2}, ['a.jsonl:1'])
    """

    def __init__(self, keep: int = 5):
        self.keep = keep
        self.first: list[RecordError] = []
        self.counts: Counter = Counter()  # (source name, reason) -> lines

    def append(self, err: RecordError) -> None:
        self.counts[(err.source.path, err.reason)] += 1
        if len(self.first) < self.keep:
            self.first.append(err)

    @property
    def full(self) -> bool:
        """Whether the first ``keep`` errors are in: further ones are only counted."""
        return len(self.first) >= self.keep

    def __len__(self) -> int:
        return sum(self.counts.values())

    def by_reason(self) -> dict[str, int]:
        """Lines left out by reason, over every source, sorted by reason."""
        out: Counter = Counter()
        for (_, reason), n in self.counts.items():
            out[reason] += n
        return dict(sorted(out.items()))

    def for_source(self, name: str) -> dict[str, int]:
        """Lines of source ``name`` left out, by reason."""
        return dict(sorted((reason, n) for (src, reason), n in self.counts.items() if src == name))


def read_records(
    path: str | Path, format: str = "auto", on_error: str = "error", skipped: list[RecordError] | SkipLog | None = None
) -> list[ChatRecord | TextRecord]:
    """Read every line of a JSONL file into records.

    Lines are split at ``\\n`` only (a lone ``\\r`` stays inside its line); ``\\r\\n`` endings and a UTF-8
    byte-order mark at the start of the file are read as the text they frame.

    Args:
        path: a ``.jsonl`` file, one JSON object per line.
        format: one of ``FORMATS``.
        on_error: ``error`` raises on the first bad line; ``skip`` leaves it out and appends its
            ``RecordError`` to ``skipped`` (so the caller can count it by ``reason``).
        skipped: a list or ``SkipLog`` collecting the skipped lines' errors under ``on_error="skip"``.

    Returns:
        One record per good line, in file order.

    Raises:
        DataFileError: ``path`` cannot be read as a JSONL file (``data_file_error``; a
            ``MissingDataFileError``, also a ``FileNotFoundError``, when it does not exist), or it
            changed while it was read. Never skipped.
        ValueError: ``format`` or ``on_error`` is unknown.
        RecordError: under ``on_error="error"``, a line is not valid UTF-8 JSON, is blank, or does
            not match the format.
    """
    return list(iter_records(path, format, on_error, skipped))


def iter_records(
    path: str | Path, format: str = "auto", on_error: str = "error", skipped: list[RecordError] | SkipLog | None = None
) -> Iterator[ChatRecord | TextRecord]:
    """Lazy version of ``read_records`` (same arguments, same errors)."""
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; choose one of {', '.join(FORMATS)}")
    if on_error not in ON_ERROR:
        raise ValueError(f"unknown on_error {on_error!r}; choose one of {', '.join(ON_ERROR)}")
    lines = iter_lines(path)
    for _, raw, src in lines:
        if (on_error == "skip" and isinstance(skipped, SkipLog) and skipped.full and raw[:1].isspace()
                and not raw.strip()):
            skipped.counts[(src.path, "blank_line")] += 1  # a million blank lines: counted, no error objects
            continue
        box = [raw]
        del raw
        try:
            yield parse_line(box, src, format)
        except RecordError as err:
            if on_error == "error":
                lines.throw(err)  # raises err, or a DataFileError when the file was cut while being read
            if skipped is not None:
                skipped.append(err)


def iter_lines(path: str | Path, what: str = "data file") -> Iterator[tuple[int, bytes, Source]]:
    """``(line number, raw bytes, Source)`` of every line of a JSONL file, 1-based, split at ``\\n``
    only, the byte-order mark of line 1 removed.

    Raises:
        DataFileError: before the first line, when ``data_file_error`` finds a problem; after the
            last, when the file changed while it was read (its size or modification time at the end
            is not the one it had when opened, e.g. it was truncated or appended to meanwhile).
    """
    problem = data_file_error(path, what)
    if problem is not None:
        raise problem
    name = str(path)
    with open(path, "rb") as f:
        before = os.fstat(f.fileno())
        try:
            # yield from: no local of this frame holds a line while the caller parses it (see parse_line)
            yield from map(functools.partial(_line_item, name), itertools.count(1), f)
        except RecordError:  # thrown in by the reader (``iter_records``): a bad line may be one cut short
            _check_unchanged(f, before, name, at_end=False)
            raise
        _check_unchanged(f, before, name, at_end=True)


def _line_item(name: str, lineno: int, raw: bytes) -> tuple[int, bytes, Source]:
    if lineno == 1 and raw.startswith(_BOM):  # written by some Windows editors; not part of the JSON
        raw = raw[len(_BOM):]
    return lineno, raw, Source(name, lineno)


def _check_unchanged(f, before: os.stat_result, name: str, at_end: bool) -> None:
    now = os.fstat(f.fileno())
    read = f.tell() if at_end else before.st_size
    if (now.st_size, now.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or read != before.st_size:
        raise DataFileError(name, f"changed while it was read ({before.st_size} bytes when opened, {now.st_size} "
                            f"now{f', {read} read' if at_end else ''}), so its lines are not one consistent "
                            "version; let the writer finish (or copy the file) and run again", "changed_while_read")


def json_error(e: json.JSONDecodeError) -> str:
    """A ``JSONDecodeError`` as ``what at column N``, without the doubled "at" of messages that end
    with it ("Unterminated string starting at").

    >>> try:
    ...     json.loads('{"text": "abc')
    ... except json.JSONDecodeError as e:
    ...     json_error(e)
    'Unterminated string starting at column 10'
    """
    return f"{e.msg}{'' if e.msg.endswith(' at') else ' at'} column {e.colno}"


def parse_line(raw: bytes | list[bytes], src: Source, format: str = "auto", prompt: bool = False) -> ChatRecord | TextRecord:
    """Decode and validate one raw JSONL line (see ``read_records``; ``prompt``: see ``parse_record``).

    ``raw`` may be a one-item list holding the bytes, which is emptied: the caller then holds no
    reference, and a 50 MB line is freed as soon as it is decoded instead of living on beside the
    decoded text and the parsed record.

    >>> parse_line(b'{"text": "abc"}', Source("a.jsonl", 3))
    TextRecord(text='abc', source=Source(path='a.jsonl', line=3))
    >>> parse_line(b'{"text": 3}', Source("a.jsonl", 3))
    Traceback (most recent call last):
    ...
    packlora.data_utils.records.RecordError: a.jsonl:3: field 'text' must be a string, got int
    """
    if isinstance(raw, list):
        raw = raw.pop()
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(
            src, f"not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8", "not_utf8"
        ) from None
    if not line.strip():
        raise RecordError(src, "blank line; remove it (every line must be one JSON object)", "blank_line")
    del raw
    try:
        obj = json.loads(line)  # the line break is JSON whitespace: no stripped copy of a 50 MB line
    except json.JSONDecodeError as e:
        body = len(line.rstrip("\r\n"))
        if e.pos >= body:  # the error is at the line break: a line cut short reads "Unterminated string"
            try:
                json.loads(line[:body])
            except json.JSONDecodeError as cut:
                e = cut
            except (RecursionError, ValueError):
                pass
        raise RecordError(
            src, f"invalid JSON ({json_error(e)}); fix or remove this line", "invalid_json"
        ) from None
    except RecursionError:
        raise RecordError(src, "JSON nested too deep for Python's reader (more than ~1,000 levels of [ or {); "
                          "fix or remove this line", "nested_too_deep") from None
    except ValueError as e:  # an integer literal longer than sys.get_int_max_str_digits()
        what = (f"an integer of more than {sys.get_int_max_str_digits():,} digits" if "digits" in str(e)
                else str(e)[:200])
        raise RecordError(src, f"invalid JSON ({what}); fix or remove this line", "invalid_json") from None
    if not isinstance(obj, dict):
        raise RecordError(src, f"expected a JSON object, got {type(obj).__name__}", "not_an_object")
    return parse_record(obj, src, format, prompt)


def parse_record(obj: dict, src: Source, format: str = "auto", prompt: bool = False) -> ChatRecord | TextRecord:
    """Validate one decoded JSON object. See ``read_records`` for formats and errors.

    ``prompt=True`` reads a chat to reply to (``packlora decode``): it need not have an assistant
    turn, and the errors do not point at training settings.
    """
    fmt = _detect(obj, src, prompt) if format == "auto" else format
    if fmt == "text":
        text = obj.get("text")
        if not isinstance(text, str):
            raise RecordError(src, f"field 'text' must be a string, got {_kind(text)}", "content_not_string")
        if not text.strip():
            raise RecordError(src, "field 'text' is empty; remove the record", "empty_text")
        return TextRecord(text=_encodable(text, "text", src), source=src)
    if fmt == "messages":
        msgs = obj.get("messages")
        if not isinstance(msgs, list):
            raise RecordError(
                src, f"field 'messages' must be a list of {{role, content}}, got {_kind(msgs)}", "bad_field"
            )
        parsed = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise RecordError(src, f"messages[{i}] must be an object, got {_kind(m)}", "bad_field")
            parsed.append(_message(m.get("role"), m.get("content"), f"messages[{i}]", src, m.get("reasoning_content")))
        field_name = "messages"
    elif fmt == "sharegpt":
        convs = obj.get("conversations")
        if not isinstance(convs, list):
            raise RecordError(
                src, f"field 'conversations' must be a list of {{from, value}}, got {_kind(convs)}", "bad_field"
            )
        parsed = []
        for i, m in enumerate(convs):
            if not isinstance(m, dict):
                raise RecordError(src, f"conversations[{i}] must be an object, got {_kind(m)}", "bad_field")
            who = m.get("from")
            if not isinstance(who, str) or who not in _SHAREGPT_ROLES:
                raise RecordError(
                    src, f"conversations[{i}].from is {who!r}; expected one of {sorted(_SHAREGPT_ROLES)}",
                    "unknown_role",
                )
            parsed.append(_message(_SHAREGPT_ROLES[who], m.get("value"), f"conversations[{i}].value", src))
        if "system" in obj:
            parsed.insert(0, _message("system", obj["system"], "system", src))
        field_name = "conversations"
    elif fmt == "alpaca":
        instr, inp, out = obj.get("instruction"), obj.get("input", ""), obj.get("output")
        fields = (("instruction", instr), ("input", inp)) + (() if prompt and out is None else (("output", out),))
        for name, val in fields:
            if not isinstance(val, str):
                raise RecordError(src, f"field {name!r} must be a string, got {_kind(val)}", "content_not_string")
        parsed = []
        if obj.get("system"):
            parsed.append(_message("system", obj["system"], "system", src))
        parsed.append(_message("user", f"{instr}\n\n{inp}" if inp else instr, "instruction", src))
        if out is not None:
            parsed.append(_message("assistant", out, "output", src))
        field_name = "output"
    else:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return ChatRecord(messages=_check_order(parsed, src, field_name, prompt), source=src)


def _detect(obj: dict, src: Source, prompt: bool = False) -> str:
    for key, fmt in (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"), ("text", "text")):
        if key in obj:
            return fmt
    raise RecordError(
        src,
        f"cannot tell the format from keys {sorted(obj)}; expected 'messages', 'conversations', "
        + ("'instruction' (a prompt to reply to)" if prompt else "'instruction'/'output' or 'text' (or set data.format)"),
        "unknown_format",
    )


def _message(role, content, field: str, src: Source, reasoning=None) -> Message:
    if role not in ROLES:
        raise RecordError(src, f"{field}.role is {role!r}; expected one of {list(ROLES)}", "unknown_role")
    if not isinstance(content, str):
        raise RecordError(src, f"{field} content must be a string, got {_kind(content)}", "content_not_string")
    if role == "assistant" and not content.strip():
        raise RecordError(
            src, f"{field} is an assistant turn with empty content; remove the record or fill it",
            "empty_assistant_turn",
        )
    if reasoning is not None:
        if role != "assistant" or not isinstance(reasoning, str):
            raise RecordError(src, f"{field}.reasoning_content must be a string on an assistant turn, got "
                              f"{_kind(reasoning)} on a {role!r} turn", "bad_field")
        reasoning = _encodable(reasoning, f"{field}.reasoning_content", src)
    return Message(role, _encodable(content, field, src), reasoning)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _encodable(text: str, field: str, src: Source) -> str:
    """``text`` if it is valid Unicode; a lone surrogate (from a JSON escape such as ``\\ud800``)
    cannot be encoded as UTF-8, so no tokenizer can read it. Searched, not encoded: no copy of a
    50 MB message."""
    bad = None if text.isascii() else _SURROGATE.search(text)
    if bad is not None:
        raise RecordError(
            src, f"{field} holds malformed Unicode (surrogates not allowed: {bad.group()!r} at character {bad.start()}, "
            "usually a broken \\u escape in the JSON); fix or remove the text", "invalid_unicode",
        )
    return text


def _check_order(msgs: list[Message], src: Source, field: str = "messages", prompt: bool = False) -> tuple[Message, ...]:
    if not msgs:
        raise RecordError(src, f"{field}: the chat has no messages", "no_messages")
    for i, m in enumerate(msgs):
        if m.role == "system" and i != 0:
            raise RecordError(
                src, f"{field}[{i}] is a system message; only the first message may be 'system'", "system_not_first"
            )
        if i and m.role != "system" and m.role == msgs[i - 1].role:
            raise RecordError(
                src, f"{field}[{i}] is a second consecutive {m.role!r} turn; merge it into {field}[{i - 1}]",
                "consecutive_same_role",
            )
    if not prompt and not any(m.role == "assistant" for m in msgs):
        raise RecordError(
            src, f"{field}: the chat has no assistant turn, so nothing would be trained; add one or drop the record",
            "no_assistant_turn",
        )
    return tuple(msgs)


def _kind(x) -> str:
    return "missing" if x is None else type(x).__name__
