"""The data is prepared once per job (issue 22): in a 2-process run one rank reads, tokenises and
packs while the other waits and loads its cache; a second run over the same data and settings
prepares nothing (every rank loads the cache, the launcher's pre-flight reads no record). Each
rank logs one ``packlora.data.prepare`` line saying which it did. Two real 2-process DeepSpeed runs on CPU.

    python -m pytest -m distributed tests/distributed/test_prepare_once.py -q
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from launching import launch
from tiny_assets import SHISHUO_CHATS, build_chatml_tokenizer, tiny_qwen2_config

pytestmark = pytest.mark.distributed

PREPARED = re.compile(r"\[\S+ \S+ rank(\d)\] INFO packlora\.data\.prepare: data (\w+): prepared in .* "
                      r"(\d+) examples tokenised, (\d+) rows packed")
LOADED = re.compile(r"\[\S+ \S+ rank(\d)\] INFO packlora\.data\.prepare: data (\w+): loaded from the cache in "
                    r"[\d.]+ s, nothing prepared \((\d+) rows")


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """A tiny 1-step run over 24 real chats, 4 of them held out, with its own data cache."""
    ws = tmp_path_factory.mktemp("prepare_once")
    build_chatml_tokenizer(ws / "tokenizer", vocab_size=400)
    lines = SHISHUO_CHATS.read_text(encoding="utf-8").splitlines()[:24]
    (ws / "chats.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cfg = {
        "output_dir": str(ws / "run1"),
        "seed": 0,
        "deepspeed": "zero2.json",
        "model": {"config": tiny_qwen2_config(400), "tokenizer": str(ws / "tokenizer")},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": [str(ws / "chats.jsonl")], "max_seq_length": 512, "overflow": "drop", "eval_holdout": 4,
                 "cache_dir": str(ws / "cache")},
        "training": {"max_steps": 1, "save_strategy": "no", "learning_rate": 1.0e-3},
    }  # fmt: skip
    path = ws / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def test_one_rank_prepares_and_a_second_run_over_the_same_data_prepares_nothing(config, tmp_path):
    ws = config.parent
    first = launch(config, "--nproc-per-node", "2", log=tmp_path / "first.log").stdout
    prepared, loaded = PREPARED.findall(first), LOADED.findall(first)
    assert [p[0] for p in prepared] == ["0"], first[-4000:]  # rank 0 tokenised, once
    assert [x[0] for x in loaded] == ["1"], first[-4000:]  # rank 1 waited and loaded its cache
    key, examples, rows = prepared[0][1], int(prepared[0][2]), int(prepared[0][3])
    report = json.loads((ws / "run1" / "data_report.json").read_text())
    assert (report["records"], report["heldout"]) == (24, 4)
    assert examples == report["examples"] == 20 - sum(report["dropped"].values()) and rows == report["rows"]
    assert loaded[0][1:] == (key, str(rows))

    stamp = [(p, p.stat().st_mtime_ns) for p in sorted((ws / "cache").rglob("*")) if p.is_file()]
    second = launch(config, "--nproc-per-node", "2", f"output_dir={ws / 'run2'}", log=tmp_path / "second.log").stdout
    assert PREPARED.findall(second) == [], second[-4000:]
    assert sorted(LOADED.findall(second)) == [("0", key, str(rows)), ("1", key, str(rows))]
    # nothing in the cache was written again: not the rows, not a file digest, not the pre-flight's mark
    assert [(p, p.stat().st_mtime_ns) for p in sorted((ws / "cache").rglob("*")) if p.is_file()] == stamp
    # both runs hold out the same 4 chats (the second from the cache's record of them), report the same
    assert (ws / "run1" / "heldout.jsonl").read_bytes() == (ws / "run2" / "heldout.jsonl").read_bytes()
    assert json.loads((ws / "run2" / "data_report.json").read_text()) == report
