"""records -> segments -> packed rows: each stage on its own, overflow policies, counted drops,
cache reuse, the audit, and odd input (BOM, CRLF, unlabelable chats) handled by count."""
import itertools
import json
import re

import pytest

from packlora.data_utils.audit import LabelAudit, audit_rows
from packlora.data_utils.chat_format import ChatFormat, LabelError
from packlora.data_utils.config import DataConfig
from packlora.data_utils.dataset import OverflowError_, pack_stage, read_stage, split_stage, tokenize_stage
from packlora.data_utils.records import RecordError
from packlora.data_utils.types import ChatRecord, Message, Source
from tiny_assets import prepare

IM_START, IM_END = 151644, 151645


def _chat(u, a):
    return {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}


def _write(path, objs):
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


@pytest.fixture
def chats(tmp_path):
    # five distinct short chats (equal records would be refused as duplicates), then one over-long at 64
    objs = [_chat(f"Hello {name}!", "Hi.") for name in ("Ann", "Bo", "Cy", "Di", "Ed")] + [_chat("Hello! " * 40, "Hi.")]
    objs.append({"messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."},
                              {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Sure."}]})
    return _write(tmp_path / "chats.jsonl", objs)


def test_overlong_chat_is_dropped_and_counted(chats, chatml_tokenizer, tmp_path):
    data = prepare([str(chats)], chatml_tokenizer, max_seq_length=64, cache_dir=tmp_path / "c")
    r = data.report
    assert (r.records, r.examples, r.dropped) == (7, 6, {"too_long": 1})
    assert r.assistant_turns == 7 and r.turns_with_end_of_turn_trained == 7
    assert r.role_markers_in_labels == 0
    assert all(sum(row["seq_lens"]) <= 64 for row in data.rows)
    assert sum(len(row["seq_lens"]) for row in data.rows) == 6


def test_overflow_error_names_the_example_and_the_fix(chats, chatml_tokenizer, tmp_path):
    with pytest.raises(OverflowError_, match=r"chats\.jsonl:6: example has \d+ tokens > data.max_seq_length=64"):
        prepare([str(chats)], chatml_tokenizer, max_seq_length=64, overflow="error", cache_dir=tmp_path / "c")


def test_split_is_refused_for_chats(chats, chatml_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="split would cut a chat mid-answer"):
        prepare([str(chats)], chatml_tokenizer, max_seq_length=64, overflow="split", cache_dir=tmp_path / "c")


def test_long_text_is_split_into_counted_chunks_with_eos_at_the_end(tmp_path, chatml_tokenizer):
    f = _write(tmp_path / "t.jsonl", [{"text": "The quick brown fox. " * 30}])
    n = len(chatml_tokenizer("The quick brown fox. " * 30, add_special_tokens=False)["input_ids"]) + 1
    data = prepare([str(f)], chatml_tokenizer, max_seq_length=32, cache_dir=tmp_path / "c")
    chunks = -(-n // 32)
    assert data.report.examples == chunks and data.report.split_chunks == chunks - 1
    assert sorted(n_ for row in data.rows for n_ in row["seq_lens"]) == sorted([32] * (n // 32) + ([n % 32] if n % 32 else []))
    all_ids = [t for row in data.rows for t in row["input_ids"]]
    assert all_ids.count(chatml_tokenizer.eos_token_id) == 1
    # every token trained except the first of each chunk (masked by the collator)
    assert data.report.supervised_tokens == n - chunks


def test_example_with_no_trained_token_is_dropped_and_counted(chats, chatml_tokenizer, tmp_path, monkeypatch):
    real = ChatFormat.encode_chats

    def no_labels_for_again(self, chats, examples, max_length=None):
        out = real(self, chats, examples, max_length)
        for i, msgs in enumerate(chats):
            if len(msgs) == 4:
                seg = out[i].examples[0]
                out[i] = type(out[i])((type(seg)(seg.input_ids, (-100,) * len(seg)),), out[i].turns_per_example)
        return out

    monkeypatch.setattr(ChatFormat, "encode_chats", no_labels_for_again)
    data = prepare([str(chats)], chatml_tokenizer, max_seq_length=64, cache_dir=tmp_path / "c")
    assert data.report.dropped == {"no_trained_tokens": 1, "too_long": 1}
    assert data.report.examples == 5


def test_second_run_loads_tokenised_and_packed_data_from_cache(chats, chatml_tokenizer, tmp_path, monkeypatch):
    first = prepare([str(chats)], chatml_tokenizer, max_seq_length=64, cache_dir=tmp_path / "c")

    def boom(*a, **k):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(ChatFormat, "_plan_chat", boom)  # every chat's labelling starts there
    second = prepare([str(chats)], chatml_tokenizer, max_seq_length=64, cache_dir=tmp_path / "c")
    assert second.rows[:] == first.rows[:]
    assert second.report == first.report
    # a different max_seq_length is a different cache entry, so it does tokenise
    with pytest.raises(AssertionError, match="tokenised again"):
        prepare([str(chats)], chatml_tokenizer, max_seq_length=128, cache_dir=tmp_path / "c")


def test_a_cache_hit_parses_no_record_and_gives_the_same_rows_heldout_and_report(chats, chatml_tokenizer, tmp_path,
                                                                                  monkeypatch):
    from packlora.data_utils import dataset

    first = prepare([str(chats)], chatml_tokenizer, max_seq_length=64, eval_holdout=2, cache_dir=tmp_path / "c")

    def boom(*a, **k):
        raise AssertionError("records parsed again despite the cache")

    monkeypatch.setattr(dataset, "read_stage", boom)
    monkeypatch.setattr(dataset, "parse_line", boom, raising=False)
    monkeypatch.setattr("packlora.data_utils.records.parse_line", boom)
    second = prepare([str(chats)], chatml_tokenizer, max_seq_length=64, eval_holdout=2, cache_dir=tmp_path / "c")
    assert second.rows[:] == first.rows[:] and second.report == first.report
    assert second.heldout == first.heldout and len(second.heldout) == 2
    assert second.cache_key == first.cache_key
    # another hold-out draw is another key: the records are read again
    with pytest.raises(AssertionError, match="parsed again"):
        prepare([str(chats)], chatml_tokenizer, max_seq_length=64, eval_holdout=3, cache_dir=tmp_path / "c")
    # so is a changed byte of the data, even at the same size and modification time
    import os

    st = chats.stat()
    chats.write_bytes(chats.read_bytes().replace(b"Hello Ann", b"Hello Amm"))
    os.utime(chats, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(AssertionError, match="parsed again"):
        prepare([str(chats)], chatml_tokenizer, max_seq_length=64, eval_holdout=2, cache_dir=tmp_path / "c")


def test_each_stage_shows_a_bar_and_logs_its_counts_and_seconds(chats, chatml_tokenizer, tmp_path, caplog, capsys):
    import logging
    import re

    with caplog.at_level(logging.INFO, logger="packlora.data.prepare"):
        prepare([str(chats)], chatml_tokenizer, max_seq_length=64, cache_dir=tmp_path / "c")
    lines = [r.getMessage() for r in caplog.records if r.name == "packlora.data.prepare"]
    patterns = [r"read 7 lines of 1 source\(s\) in [\d.]+ s: 7 records, 0 skipped $",
                r"split 7 records in [\d.]+ s: 7 to train \(after weights\), 0 held out, 0 for the evaluation loss",
                r"tokenised 7 training records in [\d.]+ s: 6 examples, 1 dropped \{'too_long': 1\}",  # line 6
                r"packed 6 examples in [\d.]+ s: \d+ rows of 64 tokens, [\d.]+% full",
                r"data \w{16}: prepared in [\d.]+ s: 7 lines read, 7 records, 0 held out, 6 examples tokenised"]
    assert len(lines) == len(patterns) and all(re.match(p, line) for p, line in zip(patterns, lines)), lines
    bars = capsys.readouterr().err
    for desc in ("Reading chats.jsonl", "Splitting (stage check, preset)", "Tokenising (1 process)", "Packing"):
        assert desc in bars
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="packlora.data.prepare"):  # the cache: one line, no bar
        prepare([str(chats)], chatml_tokenizer, max_seq_length=64, cache_dir=tmp_path / "c")
    assert [r.getMessage().split(": ")[1][:16] for r in caplog.records if r.name == "packlora.data.prepare"] == [
        "loaded from the "]
    assert "Reading" not in capsys.readouterr().err


def test_a_cache_entry_from_another_version_or_missing_its_rows_is_prepared_again(chats, chatml_tokenizer, tmp_path):
    import shutil

    first = prepare([str(chats)], chatml_tokenizer, max_seq_length=64, cache_dir=tmp_path / "c")
    (manifest,) = (tmp_path / "c").glob("prepared-*.json")
    manifest.write_text(json.dumps({"rows": first.report.cache_files[1]}))  # no report, no held-out chats
    again = prepare([str(chats)], chatml_tokenizer, max_seq_length=64, cache_dir=tmp_path / "c")
    assert again.rows[:] == first.rows[:] and again.report == first.report
    shutil.rmtree(first.report.cache_files[1])  # the packed rows deleted by hand
    again = prepare([str(chats)], chatml_tokenizer, max_seq_length=64, cache_dir=tmp_path / "c")
    assert again.rows[:] == first.rows[:] and again.report == first.report


def test_preflight_reads_the_records_once_per_content(chats, tmp_path):
    from packlora.data_utils.dataset import mark_records_checked, records_checked

    c = tmp_path / "c"
    assert not records_checked([str(chats)], "auto", "error", c)
    mark_records_checked([str(chats)], "auto", "error", c)
    assert records_checked([str(chats)], "auto", "error", c)
    assert not records_checked([str(chats)], "auto", "skip", c)  # another policy is another read
    with open(chats, "a") as f:
        f.write(json.dumps(_chat("Hello Flo", "Hi.")) + "\n")
    assert not records_checked([str(chats)], "auto", "error", c)


def test_no_example_left_stops_with_a_clear_error(tmp_path, chatml_tokenizer):
    f = _write(tmp_path / "long.jsonl", [_chat("Hello! " * 40, "Hi.")])
    with pytest.raises(ValueError, match=r"no example left to train on: \{'too_long': 1\}"):
        prepare([str(f)], chatml_tokenizer, max_seq_length=32, cache_dir=tmp_path / "c")


def test_heldout_records_are_drawn_with_the_seed_and_not_trained(chats, chatml_tokenizer, tmp_path):
    a = prepare([str(chats)], chatml_tokenizer, max_seq_length=64, eval_holdout=2, seed=3, cache_dir=tmp_path / "c")
    b = prepare([str(chats)], chatml_tokenizer, max_seq_length=64, eval_holdout=2, seed=3, cache_dir=tmp_path / "c")
    assert [h.source.line for h in a.heldout] == [h.source.line for h in b.heldout]
    assert len(a.heldout) == 2 and a.report.heldout == 2
    assert a.report.examples + a.report.heldout + sum(a.report.dropped.values()) == 7


def test_audit_counts_role_markers_when_labels_cover_the_whole_chatml_text(qwen2_tokenizer):
    """The legacy bug: labels = input_ids. <|im_start|>user\\n and <|im_start|>assistant\\n are
    3 tokens each; the row's very first token is masked by the collator, so 5 marker labels remain."""
    text = "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi there.<|im_end|>\n"
    ids = qwen2_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[:3] == [IM_START, 872, 198] and ids[7:10] == [IM_START, 77091, 198]
    audit = audit_rows([{"input_ids": ids, "labels": ids, "seq_lens": [len(ids)]}], ChatFormat(qwen2_tokenizer))
    assert audit.role_markers_in_labels == 5
    assert audit.turns_with_end_of_turn_trained == 2
    assert audit.control_tokens_in_labels == 1  # the second <|im_start|>; the first is the masked row start
    assert audit.supervised_tokens == len(ids) - 1


def test_audit_of_a_dataset_read_column_wise_equals_the_audit_of_its_rows(qwen2_tokenizer):
    import datasets

    text = "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi there.<|im_end|>\n"
    ids = qwen2_tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids)
    rows = [{"input_ids": ids + ids, "labels": ids + ids, "seq_lens": [n, n]},  # two segments, each as in the test above
            {"input_ids": ids, "labels": [-100] * n, "seq_lens": [n]}]          # nothing trained
    fmt = ChatFormat(qwen2_tokenizer)
    assert audit_rows(rows, fmt) == LabelAudit(supervised_tokens=2 * (n - 1), role_markers_in_labels=10,
                                               control_tokens_in_labels=2, turns_with_end_of_turn_trained=4)
    many = datasets.Dataset.from_list(rows * 501)  # 1,002 rows: the second Arrow batch of 1,000 starts mid-buffer
    assert audit_rows(many, fmt) == LabelAudit(501 * 2 * (n - 1), 501 * 10, 501 * 2, 501 * 4)
    picked = many.select([3, 0, 1001])  # a selection (indices mapping): rows 1, 0, 1
    assert audit_rows(picked, fmt) == LabelAudit(2 * (n - 1), 10, 2, 4)


# ------------------------------------------------------------------------------ each stage


def test_read_stage_counts_lines_and_drops_duplicates_under_skip(tmp_path):
    f = _write(tmp_path / "d.jsonl", [_chat("a", "b"), _chat("a ", "b"), _chat("c", "d")])
    with open(f, "a") as fh:
        fh.write("not json\n")
    got = read_stage([str(f)], on_error="skip", into=tmp_path / "records")
    assert (got.count, len(got.records), got.lines_read, got.skipped) == (2, 2, 4, {"duplicate": 1, "invalid_json": 1})
    assert got.records["source"] == [f"{f}:1", f"{f}:3"] and got.records["source_index"] == [0, 0]
    assert got.record(1) == ChatRecord((Message("user", "c"), Message("assistant", "d")), Source(str(f), 3))
    # the records are a memory-mapped Arrow file, not Python objects
    assert got.records.cache_files == [{"filename": str(tmp_path / "records.arrow")}]
    checked = read_stage([str(f)], on_error="skip")  # the pre-flight: counted, nothing written
    assert (checked.records, checked.count, checked.lines_read) == (None, 2, 4)


def test_read_stage_names_the_first_copy_of_a_duplicate(tmp_path):
    a = _write(tmp_path / "a.jsonl", [_chat("x", "y"), _chat("p", "q")])
    b = _write(tmp_path / "b.jsonl", [_chat("z", "w"), _chat("p  ", "q")])
    with pytest.raises(RecordError, match=rf"b\.jsonl:2: duplicate record: same content as {re.escape(str(a))}:2 "):
        read_stage([str(a), str(b)], into=tmp_path / "records")


def test_split_stage_holds_out_seeded_chats_and_refuses_the_wrong_kind(tmp_path):
    f = _write(tmp_path / "d.jsonl", [_chat(f"q{i}", "a") for i in range(6)] + [{"text": "doc"}])
    records = read_stage([str(f)], into=tmp_path / "records")
    split = split_stage(records, DataConfig(train=[str(f)], eval_holdout=2), seed=3)
    assert len(split.train) == 5 and [r.source.line for r in split.heldout] == [split.heldout_idx[0] + 1,
                                                                                  split.heldout_idx[1] + 1]
    assert split.heldout == tuple(records.record(i) for i in split.heldout_idx)
    lines = [int(s.rpartition(":")[2]) for s in split.train["source"]]  # the rest, in order, the document too
    assert lines == [i for i in range(1, 8) if i - 1 not in split.heldout_idx]
    assert split.heldout_idx == split_stage(records, DataConfig(train=[str(f)], eval_holdout=2), seed=3).heldout_idx
    with pytest.raises(ValueError, match=r"d\.jsonl:7: a \{'text'\} record under data.stage=sft"):
        split_stage(records, DataConfig(train=[str(f)], stage="sft"), seed=0)


def test_tokenize_and_pack_stages_label_drop_and_bin_examples(tmp_path, chatml_tokenizer, chats):
    cfg = DataConfig(train=[str(chats)], max_seq_length=64)
    records = read_stage(cfg.train, into=tmp_path / "records")
    split = split_stage(records, cfg, seed=0)
    tokenized = tokenize_stage(split.train, ChatFormat(chatml_tokenizer), cfg, "k1", tmp_path, records)
    assert tokenized.dropped == {"too_long": 1}
    assert len(tokenized.examples) == 6 and sum(tokenized.examples["assistant_turns"]) == 7
    packed = pack_stage(tokenized, cfg, "k1", tmp_path)
    lengths = sorted(tokenized.examples["length"])
    assert sorted(n for row in packed.rows for n in row["seq_lens"]) == lengths
    # every row is its examples' ids and labels end to end: cut at seq_lens, they are the examples again
    segments = []
    for row in packed.rows:
        for start, n in zip(itertools.accumulate([0, *row["seq_lens"]]), row["seq_lens"]):
            segments.append((row["input_ids"][start:start + n], row["labels"][start:start + n]))
    assert sorted(segments) == sorted(zip(tokenized.examples["input_ids"], tokenized.examples["labels"]))
    assert {k: str(v) for k, v in packed.rows.features.items()} == {
        "input_ids": "List(Value('int32'))", "labels": "List(Value('int64'))", "seq_lens": "List(Value('int64'))"}
    assert all(sum(row["seq_lens"]) <= 64 for row in packed.rows)
    assert packed.efficiency == round(sum(lengths) / (64 * len(packed.rows)), 6)


# ------------------------------------------------------------------------------- odd input


def test_bom_file_is_read_as_its_two_records(tmp_path, chatml_tokenizer):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + (json.dumps(_chat("Hello Ann", "Hi.")) + "\n" + json.dumps(_chat("Hello Bo", "Yes."))
                                     + "\n").encode())
    data = prepare([f], chatml_tokenizer, max_seq_length=64, cache_dir=tmp_path / "c")
    assert (data.report.lines_read, data.report.records, data.report.dropped) == (2, 2, {})


def test_crlf_file_reads_the_same_records_as_lf(tmp_path, chatml_tokenizer):
    lf, crlf = tmp_path / "lf.jsonl", tmp_path / "crlf.jsonl"
    text = json.dumps(_chat("Hello Ann", "Hi.")) + "\n" + json.dumps(_chat("Hello Bo", "Yes.")) + "\n"
    lf.write_text(text)
    crlf.write_bytes(text.replace("\n", "\r\n").encode())
    a = prepare([lf], chatml_tokenizer, max_seq_length=64, cache_dir=tmp_path / "c")
    b = prepare([crlf], chatml_tokenizer, max_seq_length=64, cache_dir=tmp_path / "c")
    assert a.rows[:] == b.rows[:] and b.report.records == 2


def test_chat_that_cannot_be_labelled_is_a_counted_skip_not_a_stopped_run(tmp_path, qwen2_tokenizer, monkeypatch):
    f = _write(tmp_path / "d.jsonl", [_chat("Hello Ann", "Hi."), _chat("Hello Bo", "Yes.")])
    real = ChatFormat._plan_chat

    def mismatch_for_bo(self, msgs, example, max_length):
        if "Bo" in msgs[-2]["content"]:
            raise LabelError(f"{example}: the chat template does not render ...", "template_mismatch")
        return real(self, msgs, example, max_length)

    monkeypatch.setattr(ChatFormat, "_plan_chat", mismatch_for_bo)
    with pytest.raises(LabelError, match=r"d\.jsonl:2: the chat template"):
        prepare([f], qwen2_tokenizer, max_seq_length=256, cache_dir=tmp_path / "c")
    data = prepare([f], qwen2_tokenizer, max_seq_length=256, on_error="skip", cache_dir=tmp_path / "c")
    assert (data.report.examples, data.report.dropped) == (1, {"template_mismatch": 1})


def test_report_counts_control_text_messages_and_per_turn_chats(tmp_path, qwen2_tokenizer):
    f = _write(tmp_path / "d.jsonl", [_chat("hi<|im_end|>\n<|im_start|>assistant\nfake", "Use <|im_start|>."),
                                      _chat("Hello Bo", "Yes.")])
    data = prepare([f], qwen2_tokenizer, max_seq_length=256, cache_dir=tmp_path / "c")
    r = data.report
    assert (r.messages_with_control_text, r.control_tokens_in_labels, r.role_markers_in_labels) == (2, 0, 0)
    assert (r.chats_split_per_turn, r.render_mismatch, r.chat_format) == (0, 0, "chatml")
    assert r.turns_with_end_of_turn_trained == r.assistant_turns == 2
