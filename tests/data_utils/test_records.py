"""Record readers: each format converts to messages; every malformed line names file and line."""
import json

import pytest

from packlora.data_utils.records import RecordError, read_records
from packlora.data_utils.types import ChatRecord, Message, TextRecord


def _write(tmp_path, lines, name="data.jsonl"):
    p = tmp_path / name
    p.write_bytes(b"".join((x if isinstance(x, bytes) else json.dumps(x, ensure_ascii=False).encode()) + b"\n" for x in lines))
    return p


def test_messages_sharegpt_alpaca_and_text_formats_convert(tmp_path):
    p = _write(tmp_path, [
        {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]},
        {"conversations": [{"from": "human", "value": "U"}, {"from": "gpt", "value": "A"}]},
        {"instruction": "Do it", "input": "this", "output": "Done"},
        {"instruction": "Do it", "output": "Done", "system": "S"},
        {"text": "raw text"},
    ])
    recs = read_records(p)
    assert recs[0].messages == (Message("system", "S"), Message("user", "U"), Message("assistant", "A"))
    assert recs[1].messages == (Message("user", "U"), Message("assistant", "A"))
    assert recs[2].messages == (Message("user", "Do it\n\nthis"), Message("assistant", "Done"))
    assert recs[3].messages == (Message("system", "S"), Message("user", "Do it"), Message("assistant", "Done"))
    assert isinstance(recs[4], TextRecord) and recs[4].text == "raw text"
    assert [r.source.line for r in recs] == [1, 2, 3, 4, 5]
    assert all(isinstance(r, ChatRecord) for r in recs[:4])


@pytest.mark.parametrize(
    "bad, problem",
    [
        (b'{"messages": [', "invalid JSON"),
        (b"\xff\xfe", "not valid UTF-8"),
        (b"   ", "blank line"),
        ({"messages": "hi"}, "'messages' must be a list"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role is 'bot'"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0] content must be a string, got int"),
        ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}, "empty content"),
        ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "s"},
                       {"role": "assistant", "content": "a"}]}, "only the first message may be 'system'"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "conversations[0].from is 'robot'"),
        ({"prompt": "x"}, "cannot tell the format"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_malformed_line_error_names_file_line_and_problem(tmp_path, bad, problem):
    good = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}
    p = _write(tmp_path, [good, bad])
    with pytest.raises(RecordError) as err:
        read_records(p)
    assert str(err.value).startswith(f"{p}:2: ")
    assert problem in str(err.value)
    assert err.value.source.line == 2


def test_missing_file_and_unknown_format_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_records(tmp_path / "nope.jsonl")
    p = _write(tmp_path, [{"text": "x"}])
    with pytest.raises(ValueError, match="unknown data format 'csv'"):
        read_records(p, format="csv")
