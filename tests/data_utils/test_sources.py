"""Data sources through ``datasets``: the same chats from JSONL, Parquet, CSV and a ``save_to_disk``
directory give the same rows; a weighted two-source mix is seeded and counted per source; parallel
tokenisation gives the same rows and the cache key ignores ``num_proc``; evaluation sets."""
import json

import pytest

from packlora.data_utils.chat_format import ChatFormat
from packlora.data_utils.config import DataConfig
from packlora.data_utils.dataset import prepare_data
from packlora.data_utils.records import RecordError
from packlora.data_utils.sources import SourceSpec, iter_source

CHATS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {i}?"},
                  {"role": "assistant", "content": f"Answer {i}."}]}
    for i in range(12)
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same 12 chats as JSONL, Parquet, CSV (messages as a JSON string) and a saved dataset."""
    import datasets

    d = tmp_path_factory.mktemp("sources")
    (d / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    ds = datasets.Dataset.from_list(CHATS)
    ds.to_parquet(str(d / "chats.parquet"))
    datasets.Dataset.from_dict({"conversation": [json.dumps(c["messages"]) for c in CHATS]}).to_csv(
        str(d / "chats.csv"), index=False)
    ds.save_to_disk(str(d / "saved"))
    other = [{"instruction": f"Say {w}", "output": f"{w}."} for w in ("one", "two", "three", "four")]
    (d / "other.jsonl").write_text("".join(json.dumps(o) + "\n" for o in other))
    return d


def _prepare(tok, train, tmp_path, **kw):
    cfg = DataConfig(train=train, cache_dir=str(tmp_path / "cache"), **{"max_seq_length": 256, **kw})
    return prepare_data(cfg, ChatFormat(tok), seed=0)


@pytest.mark.parametrize("source", ["chats.parquet", {"path": "chats.csv", "columns": {"messages": "conversation"}},
                                    "saved"])
def test_the_same_chats_from_any_source_give_the_same_rows(files, source, chatml_tokenizer, tmp_path):
    jsonl = _prepare(chatml_tokenizer, [str(files / "chats.jsonl")], tmp_path)
    spec = {**source, "path": str(files / source["path"])} if isinstance(source, dict) else str(files / source)
    other = _prepare(chatml_tokenizer, [spec], tmp_path)
    assert other.rows[:] == jsonl.rows[:]
    assert (other.report.records, other.report.examples) == (12, 12)
    [(name, counts)] = other.report.sources.items()
    assert counts == {"lines_read": 12, "records": 12, "skipped": {}, "in_mix": 12}


def test_weighted_two_source_mix_is_seeded_and_counted_per_source(files, chatml_tokenizer, tmp_path):
    train = [{"path": str(files / "chats.parquet"), "weight": 0.5}, {"path": str(files / "other.jsonl"), "weight": 2}]
    a = _prepare(chatml_tokenizer, train, tmp_path)
    assert a.report.sources == {
        str(files / "chats.parquet"): {"lines_read": 12, "records": 12, "skipped": {}, "in_mix": 6},
        str(files / "other.jsonl"): {"lines_read": 4, "records": 4, "skipped": {}, "in_mix": 8},
    }
    assert a.report.examples == 14
    b = _prepare(chatml_tokenizer, train, tmp_path / "again")
    assert a.rows[:] == b.rows[:]  # same seed, same mix


def test_max_records_keeps_the_first_valid_records_of_a_source(files):
    got = list(iter_source(SourceSpec(str(files / "saved"), max_records=3)))
    assert [r.messages[1].content for r in got] == ["Question 0?", "Question 1?", "Question 2?"]


def test_a_bad_row_in_a_dataset_names_the_source_and_row(tmp_path):
    import datasets

    rows = [CHATS[0], {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(RecordError, match=r"bad\.parquet:2: messages\[0\]\.role is 'bot'"):
        list(iter_source(SourceSpec(str(tmp_path / "bad.parquet"))))


def test_a_json_object_holding_its_records_under_one_key_says_so_and_reads_with_field(tmp_path):
    path = tmp_path / "export.json"
    path.write_text(json.dumps({"data": CHATS[:3]}))

    with pytest.raises(ValueError, match=r"export\.json: its records sit under the key 'data' .* field: data"):
        list(iter_source(SourceSpec(str(path))))
    got = list(iter_source(SourceSpec(str(path), field="data")))
    assert [r.messages[1].content for r in got] == ["Question 0?", "Question 1?", "Question 2?"]


def test_a_dataset_without_any_record_column_names_its_columns_and_the_fix(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "Hi", "completion": "Yes."}]).to_parquet(str(tmp_path / "pc.parquet"))
    with pytest.raises(ValueError, match=r"pc\.parquet: none of its columns \['prompt', 'completion'\] is a record "
                                         r"field .*; map one with columns:"):
        list(iter_source(SourceSpec(str(tmp_path / "pc.parquet"))))


def test_source_problems_name_the_key_and_the_fix():
    with pytest.raises(Exception) as e:
        DataConfig(train=[{"path": "a.jsonl", "wieght": 2}, {"path": "b.jsonl", "weight": 0}])
    text = str(e.value)
    assert "data.train[0]: unknown keys ['wieght'] (did you mean 'weight'?)" in text
    assert "data.train[1].weight: must be a number > 0, got 0" in text


def test_parallel_tokenisation_gives_the_same_rows_and_reuses_the_cache(files, chatml_tokenizer, tmp_path, monkeypatch):
    one = _prepare(chatml_tokenizer, [str(files / "chats.jsonl")], tmp_path / "a", num_proc=1)
    two = _prepare(chatml_tokenizer, [str(files / "chats.jsonl")], tmp_path / "b", num_proc=2)
    assert two.rows[:] == one.rows[:]

    def boom(*a, **k):
        raise AssertionError("tokenised again though only num_proc changed")

    monkeypatch.setattr(ChatFormat, "_plan_chat", boom)  # every chat's labelling starts there
    again = _prepare(chatml_tokenizer, [str(files / "chats.jsonl")], tmp_path / "b", num_proc=1)
    assert again.rows[:] == one.rows[:]
    with pytest.raises(AssertionError, match="tokenised again"):  # max_seq_length changes a token: rebuilt
        _prepare(chatml_tokenizer, [str(files / "chats.jsonl")], tmp_path / "b", max_seq_length=200)


def test_eval_split_draws_records_out_of_training_after_the_holdout(files, chatml_tokenizer, tmp_path):
    data = _prepare(chatml_tokenizer, [str(files / "chats.jsonl")], tmp_path, eval_holdout=2, eval_split=0.3)
    # 12 records: 2 held out to decode, round(0.3 * 10) = 3 for the evaluation loss, 7 to train on
    assert (data.report.heldout, data.report.evaluation["records"], data.report.examples) == (2, 3, 7)
    train_text = {tuple(r["input_ids"]) for r in data.rows}
    eval_ids = [tuple(r["input_ids"]) for r in data.eval_rows]
    assert not train_text & set(eval_ids) and data.report.evaluation["examples"] == 3


def test_eval_sources_are_packed_like_training(files, chatml_tokenizer, tmp_path):
    data = _prepare(chatml_tokenizer, [str(files / "chats.jsonl")], tmp_path, eval=[str(files / "other.jsonl")])
    assert data.report.evaluation == {"records": 4, "rows": 1, "examples": 4}
    assert sum(data.eval_rows[0]["seq_lens"]) == len(data.eval_rows[0]["input_ids"])
