"""records -> segments -> packed rows: overflow policies, counted drops, cache reuse, audit."""
import json

import pytest

import data_utils.dataset as ds
from data_utils.audit import audit_rows
from data_utils.dataset import OverflowError_, prepare_data

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
    data = prepare_data([str(chats)], chatml_tokenizer, max_seq_length=64, cache_dir=tmp_path / "c")
    r = data.report
    assert (r.records, r.examples, r.dropped) == (7, 6, {"too_long": 1})
    assert r.assistant_turns == 7 and r.turns_with_im_end_trained == 7
    assert r.role_markers_in_labels == 0
    assert all(sum(row["seq_lens"]) <= 64 for row in data.rows)
    assert sum(len(row["seq_lens"]) for row in data.rows) == 6


def test_overflow_error_names_the_example_and_the_fix(chats, chatml_tokenizer, tmp_path):
    with pytest.raises(OverflowError_, match=r"chats\.jsonl:6: example has \d+ tokens > data.max_seq_length=64"):
        prepare_data([str(chats)], chatml_tokenizer, max_seq_length=64, overflow="error", cache_dir=tmp_path / "c")


def test_split_is_refused_for_chats(chats, chatml_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="split would cut a chat mid-answer"):
        prepare_data([str(chats)], chatml_tokenizer, max_seq_length=64, overflow="split", cache_dir=tmp_path / "c")


def test_long_text_is_split_into_counted_chunks_with_eos_at_the_end(tmp_path, chatml_tokenizer):
    f = _write(tmp_path / "t.jsonl", [{"text": "The quick brown fox. " * 30}])
    n = len(chatml_tokenizer("The quick brown fox. " * 30, add_special_tokens=False)["input_ids"]) + 1
    data = prepare_data([str(f)], chatml_tokenizer, max_seq_length=32, cache_dir=tmp_path / "c")
    chunks = -(-n // 32)
    assert data.report.examples == chunks and data.report.split_chunks == chunks - 1
    assert sorted(n_ for row in data.rows for n_ in row["seq_lens"]) == sorted([32] * (n // 32) + ([n % 32] if n % 32 else []))
    all_ids = [t for row in data.rows for t in row["input_ids"]]
    assert all_ids.count(chatml_tokenizer.eos_token_id) == 1
    # every token trained except the first of each chunk (masked by the collator)
    assert data.report.supervised_tokens == n - chunks


def test_example_with_no_trained_token_is_dropped_and_counted(chats, chatml_tokenizer, tmp_path, monkeypatch):
    real = ds.tokenize_chat

    def no_labels_for_again(msgs, tok, eot, example):
        seg = real(msgs, tok, eot, example)
        if len(msgs) == 4:
            return type(seg)(seg.input_ids, (-100,) * len(seg))
        return seg

    monkeypatch.setattr(ds, "tokenize_chat", no_labels_for_again)
    data = prepare_data([str(chats)], chatml_tokenizer, max_seq_length=64, cache_dir=tmp_path / "c")
    assert data.report.dropped == {"no_trained_tokens": 1, "too_long": 1}
    assert data.report.examples == 5


def test_second_run_loads_tokenised_and_packed_data_from_cache(chats, chatml_tokenizer, tmp_path, monkeypatch):
    first = prepare_data([str(chats)], chatml_tokenizer, max_seq_length=64, cache_dir=tmp_path / "c")

    def boom(*a, **k):
        raise AssertionError("tokenised again despite the cache")

    monkeypatch.setattr(ds, "tokenize_chat", boom)
    second = prepare_data([str(chats)], chatml_tokenizer, max_seq_length=64, cache_dir=tmp_path / "c")
    assert second.rows[:] == first.rows[:]
    assert second.report == first.report
    # a different max_seq_length is a different cache entry, so it does tokenise
    with pytest.raises(AssertionError, match="tokenised again"):
        prepare_data([str(chats)], chatml_tokenizer, max_seq_length=128, cache_dir=tmp_path / "c")


def test_no_example_left_stops_with_a_clear_error(tmp_path, chatml_tokenizer):
    f = _write(tmp_path / "long.jsonl", [_chat("Hello! " * 40, "Hi.")])
    with pytest.raises(ValueError, match=r"no example left to train on: \{'too_long': 1\}"):
        prepare_data([str(f)], chatml_tokenizer, max_seq_length=32, cache_dir=tmp_path / "c")


def test_heldout_records_are_drawn_with_the_seed_and_not_trained(chats, chatml_tokenizer, tmp_path):
    a = prepare_data([str(chats)], chatml_tokenizer, max_seq_length=64, eval_holdout=2, seed=3, cache_dir=tmp_path / "c")
    b = prepare_data([str(chats)], chatml_tokenizer, max_seq_length=64, eval_holdout=2, seed=3, cache_dir=tmp_path / "c")
    assert [h.source.line for h in a.heldout] == [h.source.line for h in b.heldout]
    assert len(a.heldout) == 2 and a.report.heldout == 2
    assert a.report.examples + a.report.heldout + sum(a.report.dropped.values()) == 7


def test_audit_counts_role_markers_when_labels_cover_the_whole_chatml_text(qwen2_tokenizer):
    """The legacy bug: labels = input_ids. <|im_start|>user\\n and <|im_start|>assistant\\n are
    3 tokens each; the row's very first token is masked by the collator, so 5 marker labels remain."""
    text = "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi there.<|im_end|>\n"
    ids = qwen2_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[:3] == [IM_START, 872, 198] and ids[7:10] == [IM_START, 77091, 198]
    audit = audit_rows([{"input_ids": ids, "labels": ids, "seq_lens": [len(ids)]}], qwen2_tokenizer, IM_END, 151643)
    assert audit.role_markers_in_labels == 5
    assert audit.turns_with_im_end_trained == 2
    assert audit.supervised_tokens == len(ids) - 1
