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

import json
from pathlib import Path
from typing import Iterator, get_args

from packlora.core.errors import InputError, MissingPathError
from packlora.data_utils.types import ROLES, ChatRecord, Message, OnError, RecordFormat, Source, TextRecord

FORMATS = get_args(RecordFormat)
_BOM = b"\xef\xbb\xbf"
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


REASONS = (
    "not_utf8", "blank_line", "invalid_json", "not_an_object", "unknown_format", "bad_field", "unknown_role",
    "content_not_string", "no_messages", "no_assistant_turn", "empty_assistant_turn", "consecutive_same_role",
    "system_not_first", "empty_text", "invalid_unicode",
)  # fmt: skip
"""Slugs of ``RecordError.reason``; the data report counts skipped lines by these (plus ``duplicate``)."""
ON_ERROR = get_args(OnError)


class RecordError(InputError):
    """A malformed input line. ``str(err)`` starts with ``path:line:``.

    Attributes:
        source: file and 1-based line.
        problem: what is wrong and how to fix it (starts with the field at fault, if any).
        reason: a slug from ``REASONS`` (``"invalid"`` when the caller gave none).
    """

    def __init__(self, source: Source, problem: str, reason: str = "invalid"):
        self.source = source
        self.problem = problem
        self.reason = reason
        super().__init__(f"{source}: {problem}")


def read_records(
    path: str | Path, format: str = "auto", on_error: str = "error", skipped: list[RecordError] | None = None
) -> list[ChatRecord | TextRecord]:
    """Read every line of a JSONL file into records.

    Args:
        path: a ``.jsonl`` file, one JSON object per line.
        format: one of ``FORMATS``.
        on_error: ``error`` raises on the first bad line; ``skip`` leaves it out and appends its
            ``RecordError`` to ``skipped`` (so the caller can count it by ``reason``).
        skipped: list collecting the skipped lines' errors under ``on_error="skip"``.

    Returns:
        One record per good line, in file order.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``format`` or ``on_error`` is unknown.
        RecordError: under ``on_error="error"``, a line is not valid UTF-8 JSON, is blank, or does
            not match the format.
    """
    return list(iter_records(path, format, on_error, skipped))


def iter_records(
    path: str | Path, format: str = "auto", on_error: str = "error", skipped: list[RecordError] | None = None
) -> Iterator[ChatRecord | TextRecord]:
    """Lazy version of ``read_records`` (same arguments, same errors)."""
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; choose one of {', '.join(FORMATS)}")
    if on_error not in ON_ERROR:
        raise ValueError(f"unknown on_error {on_error!r}; choose one of {', '.join(ON_ERROR)}")
    path = Path(path)
    if not path.is_file():
        raise MissingPathError(f"data file not found: {path} (check data.train / data.eval in your config)")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(_BOM):  # written by some Windows editors; not part of the JSON
                raw = raw[len(_BOM):]
            try:
                yield parse_line(raw, Source(str(path), lineno), format)
            except RecordError as err:
                if on_error == "error":
                    raise
                if skipped is not None:
                    skipped.append(err)


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


def parse_line(raw: bytes, src: Source, format: str = "auto") -> ChatRecord | TextRecord:
    """Decode and validate one raw JSONL line (see ``read_records``).

    >>> parse_line(b'{"text": "abc"}', Source("a.jsonl", 3))
    TextRecord(text='abc', source=Source(path='a.jsonl', line=3))
    >>> parse_line(b'{"text": 3}', Source("a.jsonl", 3))
    Traceback (most recent call last):
    ...
    packlora.data_utils.records.RecordError: a.jsonl:3: field 'text' must be a string, got int
    """
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(
            src, f"not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8", "not_utf8"
        ) from None
    if not line.strip():
        raise RecordError(src, "blank line; remove it (every line must be one JSON object)", "blank_line")
    try:
        obj = json.loads(line.rstrip("\r\n"))  # a truncated line then reads "Unterminated string"
    except json.JSONDecodeError as e:
        raise RecordError(
            src, f"invalid JSON ({json_error(e)}); fix or remove this line", "invalid_json"
        ) from None
    if not isinstance(obj, dict):
        raise RecordError(src, f"expected a JSON object, got {type(obj).__name__}", "not_an_object")
    return parse_record(obj, src, format)


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
            if who not in _SHAREGPT_ROLES:
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


def _encodable(text: str, field: str, src: Source) -> str:
    """``text`` if it is valid Unicode; a lone surrogate (from a JSON escape such as ``\\ud800``)
    cannot be encoded as UTF-8, so no tokenizer can read it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RecordError(
            src, f"{field} holds malformed Unicode ({e.reason}: {text[e.start:e.end]!r} at character {e.start}, "
            "usually a broken \\u escape in the JSON); fix or remove the text", "invalid_unicode",
        ) from None
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
