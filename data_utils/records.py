"""Read JSONL files into validated records (``ChatRecord`` or ``TextRecord``).

Supported line formats (``format=``):

* ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
* ``sharegpt``: ``{"conversations": [{"from": "system"|"human"|"user"|"gpt"|"assistant", "value": str}, ...]}``
* ``alpaca``: ``{"instruction": str, "input": str (optional), "output": str, "system": str (optional)}``
* ``text``: ``{"text": str}`` (raw text for continued pre-training)
* ``auto``: pick one of the above per line from its keys.

Extra keys (``source``, ``id``...) are ignored. Every problem raises ``RecordError`` naming the
file, the 1-based line number, the field and the fix.

Example::

    >>> import json, tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "chats.jsonl")
    >>> with open(p, "w") as f:
    ...     _ = f.write(json.dumps({"conversations": [{"from": "human", "value": "Hi"},
    ...                                              {"from": "gpt", "value": "Hello."}]}) + "\\n")
    >>> [r.messages for r in read_records(p)]
    [(Message(role='user', content='Hi'), Message(role='assistant', content='Hello.'))]
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from data_utils.types import ROLES, ChatRecord, Message, Source, TextRecord

FORMATS = ("auto", "messages", "sharegpt", "alpaca", "text")
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class RecordError(ValueError):
    """A malformed input line. ``str(err)`` starts with ``path:line:``."""

    def __init__(self, source: Source, problem: str):
        self.source = source
        self.problem = problem
        super().__init__(f"{source}: {problem}")


def read_records(path: str | Path, format: str = "auto") -> list[ChatRecord | TextRecord]:
    """Read every line of a JSONL file into records.

    Args:
        path: a ``.jsonl`` file, one JSON object per line.
        format: one of ``FORMATS``.

    Returns:
        One record per line, in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``format`` is unknown.
        RecordError: a line is not valid UTF-8 JSON, is blank, or does not match the format.
    """
    return list(iter_records(path, format))


def iter_records(path: str | Path, format: str = "auto") -> Iterator[ChatRecord | TextRecord]:
    """Lazy version of ``read_records`` (same arguments, same errors)."""
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path} (check data.train / data.eval in your config)")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            src = Source(str(path), lineno)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise RecordError(src, f"not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8")
            if not line.strip():
                raise RecordError(src, "blank line; remove it (every line must be one JSON object)")
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(src, f"invalid JSON ({e.msg} at column {e.colno}); fix or remove this line")
            if not isinstance(obj, dict):
                raise RecordError(src, f"expected a JSON object, got {type(obj).__name__}")
            yield parse_record(obj, src, format)


def parse_record(obj: dict, src: Source, format: str = "auto") -> ChatRecord | TextRecord:
    """Validate one decoded JSON object. See ``read_records`` for formats and errors."""
    fmt = _detect(obj, src) if format == "auto" else format
    if fmt == "text":
        text = obj.get("text")
        if not isinstance(text, str):
            raise RecordError(src, f"field 'text' must be a string, got {_kind(text)}")
        if not text.strip():
            raise RecordError(src, "field 'text' is empty")
        return TextRecord(text=text, source=src)
    if fmt == "messages":
        msgs = obj.get("messages")
        if not isinstance(msgs, list):
            raise RecordError(src, f"field 'messages' must be a list of {{role, content}}, got {_kind(msgs)}")
        parsed = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise RecordError(src, f"messages[{i}] must be an object, got {_kind(m)}")
            parsed.append(_message(m.get("role"), m.get("content"), f"messages[{i}]", src))
    elif fmt == "sharegpt":
        convs = obj.get("conversations")
        if not isinstance(convs, list):
            raise RecordError(src, f"field 'conversations' must be a list of {{from, value}}, got {_kind(convs)}")
        parsed = []
        for i, m in enumerate(convs):
            if not isinstance(m, dict):
                raise RecordError(src, f"conversations[{i}] must be an object, got {_kind(m)}")
            who = m.get("from")
            if who not in _SHAREGPT_ROLES:
                raise RecordError(
                    src, f"conversations[{i}].from is {who!r}; expected one of {sorted(_SHAREGPT_ROLES)}"
                )
            parsed.append(_message(_SHAREGPT_ROLES[who], m.get("value"), f"conversations[{i}].value", src))
        if "system" in obj:
            parsed.insert(0, _message("system", obj["system"], "system", src))
    elif fmt == "alpaca":
        instr, inp, out = obj.get("instruction"), obj.get("input", ""), obj.get("output")
        for name, val in (("instruction", instr), ("input", inp), ("output", out)):
            if not isinstance(val, str):
                raise RecordError(src, f"field {name!r} must be a string, got {_kind(val)}")
        parsed = []
        if obj.get("system"):
            parsed.append(_message("system", obj["system"], "system", src))
        parsed.append(Message("user", f"{instr}\n\n{inp}" if inp else instr))
        parsed.append(_message("assistant", out, "output", src))
    else:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return ChatRecord(messages=_check_order(parsed, src), source=src)


def _detect(obj: dict, src: Source) -> str:
    for key, fmt in (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"), ("text", "text")):
        if key in obj:
            return fmt
    raise RecordError(
        src,
        f"cannot tell the format from keys {sorted(obj)}; expected 'messages', 'conversations', "
        "'instruction'/'output' or 'text' (or set data.format)",
    )


def _message(role, content, field: str, src: Source) -> Message:
    if role not in ROLES:
        raise RecordError(src, f"{field}.role is {role!r}; expected one of {list(ROLES)}")
    if not isinstance(content, str):
        raise RecordError(src, f"{field} content must be a string, got {_kind(content)}")
    if role == "assistant" and not content.strip():
        raise RecordError(src, f"{field} is an assistant turn with empty content; remove the record or fill it")
    return Message(role, content)


def _check_order(msgs: list[Message], src: Source) -> tuple[Message, ...]:
    if not msgs:
        raise RecordError(src, "the chat has no messages")
    for i, m in enumerate(msgs):
        if m.role == "system" and i != 0:
            raise RecordError(src, f"messages[{i}] is a system message; only the first message may be 'system'")
    if not any(m.role == "assistant" for m in msgs):
        raise RecordError(src, "the chat has no assistant turn, so nothing would be trained; add one or drop the record")
    return tuple(msgs)


def _kind(x) -> str:
    return "missing" if x is None else type(x).__name__
