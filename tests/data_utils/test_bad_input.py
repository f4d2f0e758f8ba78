"""The bad-input corpus (``tests/data_utils/bad_inputs/``): every kind of broken record gets an
error naming file, line and field under ``data.on_error: error``, or a counted skip under ``skip``;
over-long examples follow the overflow policy and are never half-trained; a run left with no
example stops before training.

Each corpus file holds good lines (distinct across files) and one bad line, given below with
its 1-based line number, a piece of the expected message (the field at fault) and the reason
slug the data report counts it under.
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from packlora.data_utils.dataset import NoExampleError, OverflowError_
from packlora.data_utils.records import REASONS, RecordError, read_records
from packlora.data_utils.types import IGNORE_INDEX
from tiny_assets import prepare

CORPUS = Path(__file__).parent / "bad_inputs"
REPO_ROOT = Path(__file__).resolve().parents[2]

# file -> (bad line, message piece naming the field/problem, reason, good lines in the file)
BAD = {
    "truncated_json.jsonl": (2, "invalid JSON (Unterminated string starting at column ", "invalid_json", 1),
    # the Latin-1 byte of "caf\xe9" sits at 0-based byte 14 + 17 + 12 + 3 = 46 of the line
    "non_utf8.jsonl": (2, "not valid UTF-8 (invalid continuation byte at byte 46)", "not_utf8", 1),
    "empty_line.jsonl": (2, "blank line; remove it", "blank_line", 2),
    "missing_messages.jsonl": (2, "cannot tell the format from keys ['conversation', 'id']", "unknown_format", 1),
    "unknown_role.jsonl": (2, "messages[1].role is 'bot'", "unknown_role", 1),
    "content_not_string.jsonl": (2, "messages[0] content must be a string, got list", "content_not_string", 1),
    "no_assistant_turn.jsonl": (2, "messages: the chat has no assistant turn", "no_assistant_turn", 1),
    "empty_assistant_turn.jsonl": (2, "messages[1] is an assistant turn with empty content", "empty_assistant_turn", 1),
    "consecutive_user_turns.jsonl": (
        2, "messages[1] is a second consecutive 'user' turn; merge it into messages[0]", "consecutive_same_role", 1,
    ),
    "system_not_first.jsonl": (2, "messages[1] is a system message; only the first", "system_not_first", 1),
    "malformed_unicode_escape.jsonl": (
        2, "messages[0] holds malformed Unicode (surrogates not allowed: '\\ud800' at character 7", "invalid_unicode", 1,
    ),
    # issue 25: found by reasoning about the reader and by the property tests' long search (tests/fuzzing.py)
    "nested_too_deep.jsonl": (2, "JSON nested too deep for Python's reader", "nested_too_deep", 1),
    "huge_integer.jsonl": (2, "invalid JSON (an integer of more than 4,300 digits)", "invalid_json", 1),
    "sharegpt_from_not_a_string.jsonl": (2, "conversations[0].from is ['human']; expected one of", "unknown_role", 1),
    "lone_cr_line_break.jsonl": (2, "invalid JSON (Extra data at column 92)", "invalid_json", 1),
    "bom_in_middle.jsonl": (2, "invalid JSON (Unexpected UTF-8 BOM", "invalid_json", 1),
    "bzh_first_line.jsonl": (1, "invalid JSON (Expecting value at column 1)", "invalid_json", 1),  # not a bzip2 file
}
DUPLICATE = "duplicate_record.jsonl"  # line 3 repeats line 1 up to whitespace; lines 1-2 are good
# files that are odd but valid: read exactly (file -> the messages of each line)
ODD = {
    "bom.jsonl": [("Read the BOM file", "It has two lines."), ("And the second?", "Read as well.")],
    "crlf_line_endings.jsonl": [("Windows line one", "First."), ("Windows line two", "Second.")],
    "reply_edge_whitespace.jsonl": [("Trim nothing", "\n  Indented reply.  ")],
}
# a chat that cannot be labelled under a setting (Qwen3, enable_thinking: false): line 2
LABEL_ERROR = "reasoning_with_thinking_off.jsonl"


def _chat(u, a):
    return {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}


def _write(path: Path, objs) -> Path:
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in objs), encoding="utf-8")
    return path


def test_corpus_has_one_file_per_kind():
    assert sorted(p.name for p in CORPUS.glob("*.jsonl")) == sorted([*BAD, DUPLICATE, *ODD, LABEL_ERROR])
    assert {reason for _, _, reason, _ in BAD.values()} <= set(REASONS)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_record_error_names_file_line_and_field(name):
    line, piece, reason, _ = BAD[name]
    path = CORPUS / name
    with pytest.raises(RecordError) as err:
        read_records(path)
    assert str(err.value).startswith(f"{path}:{line}: "), str(err.value)
    assert piece in str(err.value)
    assert (err.value.source.line, err.value.reason) == (line, reason)


def test_missing_messages_under_an_explicit_format_names_the_field():
    with pytest.raises(RecordError, match=r"missing_messages\.jsonl:2: field 'messages' must be a list .*got missing"):
        read_records(CORPUS / "missing_messages.jsonl", format="messages")


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_record_is_skipped_and_reported_under_on_error_skip(name):
    line, _, reason, good = BAD[name]
    skipped: list[RecordError] = []
    records = read_records(CORPUS / name, on_error="skip", skipped=skipped)
    assert len(records) == good
    assert line not in [r.source.line for r in records]
    assert [(e.source.line, e.reason) for e in skipped] == [(line, reason)]


@pytest.mark.parametrize("name", sorted(ODD))
def test_odd_but_valid_file_is_read_exactly(name):
    records = read_records(CORPUS / name)
    assert [tuple(m.content for m in r.messages) for r in records] == ODD[name]
    assert [r.source.line for r in records] == list(range(1, len(ODD[name]) + 1))


def test_reply_with_edge_whitespace_is_trained_exactly_as_written(qwen2_tokenizer, tmp_path):
    data = prepare([CORPUS / "reply_edge_whitespace.jsonl"], qwen2_tokenizer, max_seq_length=128,
                   cache_dir=tmp_path / "c")
    row = data.rows[0]
    trained = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != IGNORE_INDEX]
    assert qwen2_tokenizer.decode(trained) == "\n  Indented reply.  <|im_end|>"
    assert data.report.render_mismatch == 0


def test_unlabelable_chat_is_an_error_naming_its_line_or_a_counted_skip(tmp_path):
    from packlora.data_utils.chat_format import ChatFormat, LabelError
    from packlora.data_utils.config import DataConfig
    from packlora.data_utils.dataset import prepare_data
    from tiny_assets import build_qwen3_tokenizer

    path = CORPUS / LABEL_ERROR
    tok = build_qwen3_tokenizer(tmp_path / "qwen3")
    for on_error in ("error", "skip"):
        cfg = DataConfig(train=[str(path)], max_seq_length=128, enable_thinking=False, on_error=on_error,
                         cache_dir=str(tmp_path / "c"))
        fmt = cfg.chat_format_for(tok)
        if on_error == "error":
            with pytest.raises(LabelError, match=f"{path}:2: an assistant reply carries reasoning but "
                                                 "data.enable_thinking is false"):
                prepare_data(cfg, fmt)
        else:
            data = prepare_data(cfg, fmt)
            assert (data.report.examples, data.report.dropped) == (1, {"reasoning_with_thinking_off": 1})
    assert isinstance(fmt, ChatFormat)


def test_unknown_on_error_is_refused():
    with pytest.raises(ValueError, match="unknown on_error 'ignore'; choose one of error, skip"):
        read_records(CORPUS / "empty_line.jsonl", on_error="ignore")


def test_duplicate_record_is_an_error_naming_both_lines(chatml_tokenizer, tmp_path):
    path = CORPUS / DUPLICATE
    with pytest.raises(RecordError) as err:
        prepare([str(path)], chatml_tokenizer, max_seq_length=64, cache_dir=tmp_path / "c")
    assert str(err.value).startswith(f"{path}:3: duplicate record: same content as {path}:1 ")
    assert err.value.reason == "duplicate"


def test_whole_corpus_under_skip_keeps_every_good_line_and_counts_each_bad_one(chatml_tokenizer, tmp_path):
    files = [str(CORPUS / n) for n in sorted([*BAD, DUPLICATE])]
    data = prepare(files, chatml_tokenizer, max_seq_length=256, on_error="skip", cache_dir=tmp_path / "c")
    r = data.report
    good = sum(g for *_, g in BAD.values()) + 2  # the duplicate file has 2 good lines
    assert good == 20
    # 18 bad lines (17 files with one each, one duplicate) each counted once under its reason;
    # every good line is trained
    assert r.dropped == {"blank_line": 1, "consecutive_same_role": 1, "content_not_string": 1, "duplicate": 1,
                         "empty_assistant_turn": 1, "invalid_json": 5, "invalid_unicode": 1, "nested_too_deep": 1,
                         "no_assistant_turn": 1, "not_utf8": 1, "system_not_first": 1, "unknown_format": 1,
                         "unknown_role": 2}
    assert sum(r.dropped.values()) == len(BAD) + 1 == 18
    assert (r.lines_read, r.records, r.examples) == (good + 18, good, good)
    assert r.assistant_turns == good == r.turns_with_end_of_turn_trained
    for name in files:  # per source: every line is a record or a counted skip
        src = r.sources[name]
        assert src["lines_read"] == src["records"] + sum(src["skipped"].values())
    saved = json.loads(json.dumps(r.to_dict()))
    assert saved["dropped"]["duplicate"] == 1 and saved["lines_read"] == 38


def test_every_line_skipped_stops_with_the_reasons(chatml_tokenizer, tmp_path):
    bad = tmp_path / "all_bad.jsonl"
    bad.write_bytes(b'{"messages": [\n\n{"text": 3}\n')
    with pytest.raises(NoExampleError) as err:
        prepare([str(bad)], chatml_tokenizer, max_seq_length=64, on_error="skip", cache_dir=tmp_path / "c")
    msg = str(err.value)
    assert msg.startswith(
        "no example left to train on: {'blank_line': 1, 'content_not_string': 1, 'invalid_json': 1} dropped of 3 lines"
    )
    assert "set data.on_error=error" in msg
    assert err.value.report == {
        "lines_read": 3, "records": 0, "examples": 0,
        "dropped": {"blank_line": 1, "content_not_string": 1, "invalid_json": 1},
    }


# --------------------------------------------------------------------------- over-long examples

LONG_USER = "Hello! " * 40  # ~80 tokens with the tiny tokenizer: over 64 on its own


@pytest.fixture
def long_chats(tmp_path):
    return _write(tmp_path / "long.jsonl", [_chat("Short question?", "Short answer."), _chat(LONG_USER, "Hi.")])


def test_overlong_chat_under_error_names_the_line(long_chats, chatml_tokenizer, tmp_path):
    with pytest.raises(OverflowError_, match=r"long\.jsonl:2: example has \d+ tokens > data.max_seq_length=64"):
        prepare([str(long_chats)], chatml_tokenizer, max_seq_length=64, overflow="error", cache_dir=tmp_path / "c")


@pytest.mark.parametrize("overflow", ["drop", "auto"])
def test_overlong_chat_under_drop_is_counted(long_chats, chatml_tokenizer, tmp_path, overflow):
    data = prepare([str(long_chats)], chatml_tokenizer, max_seq_length=64, overflow=overflow, cache_dir=tmp_path / "c")
    assert (data.report.records, data.report.examples, data.report.dropped) == (2, 1, {"too_long": 1})


def test_overlong_chat_under_split_is_refused(long_chats, chatml_tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"long\.jsonl:1: data.overflow=split would cut a chat mid-answer"):
        prepare([str(long_chats)], chatml_tokenizer, max_seq_length=64, overflow="split", cache_dir=tmp_path / "c")


def test_overlong_text_under_split_becomes_counted_chunks(chatml_tokenizer, tmp_path):
    f = _write(tmp_path / "t.jsonl", [{"text": "The quick brown fox. " * 12}])
    data = prepare([str(f)], chatml_tokenizer, max_seq_length=32, overflow="split", cache_dir=tmp_path / "c")
    n = len(chatml_tokenizer("The quick brown fox. " * 12, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert n > 32
    assert (data.report.examples, data.report.split_chunks, data.report.dropped) == (-(-n // 32), -(-n // 32) - 1, {})


def test_answer_that_would_be_cut_is_dropped_whole_never_half_trained(chatml_tokenizer, tmp_path):
    """The prompt fits in 64 tokens, the answer pushes the chat past it: no row holds any part of it."""
    answer = "Once upon a time there lived a scholar who loved wine and poems. " * 3
    prompt_ids = chatml_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell a story."}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert len(prompt_ids) < 64
    f = _write(tmp_path / "cut.jsonl", [_chat("Short question?", "Short answer."), _chat("Tell a story.", answer)])
    data = prepare([str(f)], chatml_tokenizer, max_seq_length=64, cache_dir=tmp_path / "c")
    assert data.report.dropped == {"too_long": 1} and data.report.examples == 1
    story = chatml_tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    for row in data.rows:
        trained = [t for t in row["labels"] if t != IGNORE_INDEX]
        assert not _contains(row["input_ids"], story) and not _contains(trained, story)


def _contains(seq, sub) -> bool:
    return any(list(seq[i : i + len(sub)]) == list(sub) for i in range(len(seq) - len(sub) + 1))


# --------------------------------------------------------------------------- a whole run


def test_training_run_with_every_example_dropped_stops_before_training_and_writes_the_report(
    chatml_tokenizer_dir, tmp_path
):
    data = _write(tmp_path / "long.jsonl", [_chat(LONG_USER, "Hi."), _chat(LONG_USER + "Again.", "Hi.")])
    out = tmp_path / "run"
    cfg = {
        "output_dir": str(out), "deepspeed": None,
        "model": {"config": {"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "num_key_value_heads": 1},
                  "tokenizer": str(chatml_tokenizer_dir)},
        "data": {"train": [str(data)], "max_seq_length": 32, "cache_dir": str(tmp_path / "cache")},
        "training": {"max_steps": 1, "report_to": []},
    }  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        [sys.executable, "-m", "packlora.train", str(tmp_path / "run.yaml")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "packlora train: error: no example left to train on: {'too_long': 2} dropped of 2 records" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads((out / "data_report.json").read_text()) == {
        "lines_read": 2, "records": 2, "examples": 0, "dropped": {"too_long": 2}
    }
    assert not (out / "base_model").exists(), "the model was built although there was nothing to train"


def test_readme_table_lists_every_reason_and_nothing_else():
    """README.md's table of reasons (between ``<!-- reasons -->`` markers) is the documented list the
    property tests check skips and errors against: it names each reason the code can give, once."""
    import re

    from packlora.data_utils.dataset import DROP_REASONS
    from packlora.data_utils.records import FILE_REASONS, PROMPT_REASONS

    readme = (REPO_ROOT / "README.md").read_text()
    table = readme.split("<!-- reasons -->")[1].split("<!-- /reasons -->")[0]
    documented = [r for row in table.splitlines()[2:] if row.startswith("|")
                  for r in re.findall(r"`([a-z0-9_]+)`", row.split("|")[1])]
    assert sorted(documented) == sorted({*DROP_REASONS, *PROMPT_REASONS, *FILE_REASONS})
    assert len(documented) == len(set(documented))
