"""`packlora inspect` on the bundled default config: the real Qwen2 tokenizer and real chats."""
import json
import re

import pytest
from pathlib import Path

from packlora.training.inspect_cli import JSON_KEYS, main

REPO = Path(__file__).resolve().parents[2]


def test_default_config_trains_no_role_marker_and_every_im_end(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the config's paths are relative to the repo root
    rc = main(["configs/shishuo_tiny.yaml", f"data.cache_dir={tmp_path}", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert tuple(report) == JSON_KEYS
    assert report["records"] == 3434  # ../shared/data/shishuo/stage2_rewrite.jsonl
    assert report["examples"] == 3434 - 4 - sum(report["dropped"].values())  # 4 held out
    assert report["role_markers_in_labels"] == 0
    assert report["turns_with_end_of_turn_trained"] == report["assistant_turns"] > report["examples"]  # some 2-turn chats
    assert 0.95 < report["packing_efficiency"] <= 1.0


def test_human_view_marks_trained_spans(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    rc = main(["configs/shishuo_tiny.yaml", f"data.cache_dir={tmp_path}", "data.max_seq_length=256", "--no-color"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "<|im_start|>assistant\n[[" in out and "<|im_end|>]]" in out
    assert "[[<|im_start|>" not in out
    assert re.search(r"\nrole_markers_in_labels +0\n", out)


def test_overrides_may_come_before_or_after_the_flags(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    argv = ["configs/shishuo_tiny.yaml", f"data.cache_dir={tmp_path}", "--json", "data.max_seq_length=256",
            "data.eval_holdout=2"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["heldout"] == 2 and report["examples"] + 2 + sum(report["dropped"].values()) == report["records"]


def test_missing_model_bad_key_and_bad_record_are_one_line_errors_without_traceback(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "Hi", "completion": "Yes."}\n')
    cases = [
        (["configs/shishuo_tiny.yaml", "model.config=null", "model.name_or_path=models/nowhere"],
         "model.name_or_path: 'models/nowhere' does not exist"),
        (["configs/shishuo_tiny.yaml", "data.max_seq_lenght=64"],
         "data.max_seq_lenght: unknown key (did you mean 'max_seq_length'?) (set on the command line)"),
        (["configs/shishuo_tiny.yaml", f"data.train=[{bad}]", f"data.cache_dir={tmp_path}"],
         f"{bad}:1: cannot tell the format from keys ['completion', 'prompt']"),
    ]
    for argv, message in cases:
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.startswith("packlora inspect: error: ")
        assert message in err, err
    with pytest.raises(ValueError, match="unknown key"):  # --debug lets the exception through
        main(["configs/shishuo_tiny.yaml", "data.max_seq_lenght=64", "--debug"])


def test_counts_per_source_and_of_the_evaluation_set_are_shown(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    source = "../shared/data/shishuo/stage2_rewrite.jsonl"
    base = ["configs/shishuo_tiny.yaml", f"data.cache_dir={tmp_path}", "data.max_seq_length=256"]
    assert main([*base, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sources"] == {source: {"lines_read": 3434, "records": 3434, "skipped": {}, "in_mix": 3430}}  # 4 held out
    assert report["evaluation"]["records"] == 0

    assert main([*base, "data.eval_split=20", "--no-color"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"\nsource +{re.escape(source)}: lines_read 3434, records 3434, in_mix 3410\n", out)
    assert re.search(r"\nevaluation +records 20, rows \d+, examples 20\n", out)
