from __future__ import annotations

import json

import pytest

from packlora.decoding.cli import decode_file, main, read_prompts
from packlora.decoding.generate import generate_replies, load_checkpoint

KEYS = {"source", "messages", "reference", "reply", "stop_reason", "num_new_tokens"}


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def prompts_file(tmp_path):
    return _write_jsonl(tmp_path / "prompts.jsonl", [
        {"messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."}]},
        {"conversations": [{"from": "system", "value": "Be brief."},
                           {"from": "human", "value": "The quick brown fox"}]},
    ])


def test_read_prompts_splits_off_the_final_assistant_turn_as_reference(tmp_path, prompts_file):
    extra = _write_jsonl(tmp_path / "more.jsonl", [
        {"instruction": "Say hi", "output": "Hi."},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}]},
    ])
    p1, p2 = read_prompts(prompts_file)
    assert (p1.messages, p1.reference, str(p1.source)) == (
        ({"role": "user", "content": "Hello!"},), "Hi there.", f"{prompts_file}:1"
    )
    assert (p2.messages, p2.reference) == (
        ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"}), None
    )
    a, c = read_prompts(extra)
    assert (a.messages, a.reference) == (({"role": "user", "content": "Say hi"},), "Hi.")
    assert (len(c.messages), c.messages[-1]["content"], c.reference) == (3, "c", None)
    assert len(read_prompts(prompts_file, limit=1)) == 1


def test_text_record_is_an_error_naming_file_and_line(tmp_path, prompts_file, capsys):
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "x"}]}, {"text": "doc"}])
    assert main(["unused-ckpt", "--input", str(bad), "--output", str(tmp_path / "o.jsonl")]) == 1
    assert f"{bad}:2: a {{'text'}} line has no chat to reply to" in capsys.readouterr().err


def test_sampling_flags_without_do_sample_are_rejected(prompts_file, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ckpt", "--input", str(prompts_file), "--output", str(tmp_path / "o.jsonl"), "--temperature", "0.7"])
    assert exit_info.value.code == 2
    assert "--temperature only apply with --do-sample" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ckpt", "--input", str(prompts_file), "--output", str(tmp_path / "o.jsonl"), "--top-k", "20"])
    assert "--top-k only apply with --do-sample" in capsys.readouterr().err


def test_decode_cli_writes_one_line_per_prompt(adapter_ckpt, prompts_file, tmp_path, capsys):
    ckpt_dir, out = adapter_ckpt[0] / "ckpt", tmp_path / "out" / "replies.jsonl"
    argv = [str(ckpt_dir), "--input", str(prompts_file), "--output", str(out),
            "--max-new-tokens", "6", "--batch-size", "2"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 2 and all(set(r) == KEYS for r in rows)
    assert [r["source"] for r in rows] == [f"{prompts_file}:1", f"{prompts_file}:2"]
    assert [r["reference"] for r in rows] == ["Hi there.", None]
    assert rows[0]["messages"] == [{"role": "user", "content": "Hello!"}]
    assert [m["role"] for m in rows[1]["messages"]] == ["system", "user"]
    for r in rows:
        assert r["stop_reason"] in ("stop_id", "max_new_tokens")
        assert (r["num_new_tokens"] == 6) if r["stop_reason"] == "max_new_tokens" else (1 <= r["num_new_tokens"] <= 6)

    # The lines hold exactly what generate_replies gives for the same prompts.
    ckpt = load_checkpoint(ckpt_dir)
    prompts = [r["messages"] for r in rows]
    replies = generate_replies(ckpt.model, ckpt.fmt, prompts, ckpt.stop_ids, max_new_tokens=6)
    assert [(r["reply"], r["stop_reason"], r["num_new_tokens"]) for r in rows] == [
        (x.text, x.stop_reason, x.num_new_tokens) for x in replies
    ]
    n_stop = sum(r["stop_reason"] == "stop_id" for r in rows)
    assert f"decoded 2 prompts: {n_stop} stopped at a stop id, {2 - n_stop} hit max_new_tokens; wrote {out}" in (
        capsys.readouterr().out
    )


def test_decode_file_accepts_a_loaded_checkpoint_and_limit(adapter_ckpt, prompts_file, tmp_path):
    ckpt = load_checkpoint(adapter_ckpt[0] / "ckpt")
    rows = decode_file(ckpt, prompts_file, tmp_path / "o.jsonl", limit=1, max_new_tokens=3)
    assert len(rows) == 1 and rows[0]["reference"] == "Hi there."
    assert [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()] == rows


def test_decode_preset_appends_its_guard_to_the_corpus_system_prompt(adapter_ckpt, tmp_path):
    root, _ = adapter_ckpt
    system = "你是一个文学创作助手，擅长张恨水的章回小说文风。"
    guard = "你的回复必须在完成续写后立即结束，不得继续生成任何对话、提示或新任务。"
    prompts = _write_jsonl(tmp_path / "p.jsonl", [
        {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "续写：雨停了。"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"messages": [{"role": "user", "content": "Hi"}]},
    ])
    rows = decode_file(root / "ckpt", prompts, tmp_path / "o.jsonl", max_new_tokens=2, preset="zhang_henshui")
    assert [r["messages"][0] for r in rows] == [
        {"role": "system", "content": system + guard},  # the preset's own prompt: guard appended
        {"role": "system", "content": "Be brief."},  # a foreign one is kept
        {"role": "system", "content": system + guard},  # none: the preset's whole message
    ]


@pytest.mark.parametrize("run_config, random_base", [
    ({"model": {"config": {"model_type": "qwen2"}, "tokenizer": "tok"}}, True),  # the demo: LoRA on a random base
    ({"model": {"name_or_path": "base"}}, False),  # a real base: the stop ids may be at fault
    ({"model": {"config": {"model_type": "qwen2"}}, "init_from": "stage1"}, False),  # stage 2 on a trained stage 1
    ({}, False),  # no packlora_config.yaml: nothing known about the base
])
def test_the_check_the_stop_ids_hint_is_not_given_for_an_adapter_on_a_random_base(tmp_path, run_config, random_base):
    import yaml

    from packlora.decoding.cli import max_new_tokens_hint

    (tmp_path / "adapter_config.json").write_text("{}")
    if run_config:
        (tmp_path / "packlora_config.yaml").write_text(yaml.safe_dump(run_config))
    hint = max_new_tokens_hint(tmp_path)
    assert ("check that the checkpoint's stop ids" in hint) is not random_base
    assert ("built at random from model.config" in hint and "scripts/see_it_stop.py" in hint) is random_base
