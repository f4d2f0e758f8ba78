"""scripts/see_it_stop.py: its --quick smoke run (every step on tiny models), and its side-by-side
view and counts on hand-written replies. The real run (several minutes) is a documented command,
measured in README.md, not a test."""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from launching import launch_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "see_it_stop.py"


@pytest.fixture(scope="module")
def sis():
    spec = importlib.util.spec_from_file_location("see_it_stop", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["see_it_stop"] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["see_it_stop"]
    return module


def _row(reply, stop_reason, stop_token, n, *, user_turn=False, role_leak=False):
    return {"source": "/w/heldout_chats.jsonl:1", "prompt": "请把下面这段现代文改写成文言：\n王戎七岁时游玩。",
            "reference": "王戎七岁，尝游。", "reply": reply, "stop_reason": stop_reason, "stop_token": stop_token,
            "num_new_tokens": n, "stop_ids": "", "user_turn": user_turn, "role_leak": role_leak,
            "emitted_end_of_turn": True, "hit_max_new_tokens": stop_reason == "max_new_tokens"}


def test_quick_mode_runs_every_step_and_prints_the_two_models_side_by_side(tmp_path):
    """Split, base (tokenizer + pre-training, cached), both LoRA runs, decoding, the view and the
    summary, on tiny models (too small to learn: the exit status does not ask for a stop)."""
    cmd = [sys.executable, str(SCRIPT), "--quick", "--show", "2", "--width", "100",
           "--work-dir", str(tmp_path / "work"), "--base-cache", str(tmp_path / "base-cache")]
    proc = subprocess.run(cmd, cwd=REPO, env=launch_env(), capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, (out + proc.stderr)[-4000:]
    assert out.count("held-out prompt ") == 2
    assert "legacy: whole-chat labels," in out and "packlora: assistant-only labels," in out
    assert "stops at <|endoftext|> only (--no-stop-ids)" in out and "stops at <|im_end|>, <|endoftext|>" in out
    assert "over 3 held-out prompts (sampled like Qwen2.5-Instruct, seed 0, max_new_tokens 12):" in out
    for kind in ("legacy", "packlora"):
        assert re.search(rf"{kind} [0-9.]+ min \(3 steps, [0-9.]+ s/step\)", out), out[-600:]
    assert "1-minute load average" in out
    assert len(list((tmp_path / "base-cache").glob("*/stage1/model.safetensors"))) == 1
    for kind in ("legacy", "packlora"):
        config = (tmp_path / "work" / kind / "packlora_config.yaml").read_text()
        assert ("legacy_full_sequence" in config) is (kind == "legacy")


def test_cjk_text_wraps_by_terminal_columns(sis):
    assert sis._wrap("王戎七岁ab", 5) == ["王戎", "七岁a", "b"]  # a CJK character takes 2 columns
    assert sis._wrap("甲\n\n乙", 4) == ["甲", "", "乙"]
    assert sis._wrap("王戎。<|im_end|>x", 10) == ["王戎。", "<|im_end|>", "x"]  # a control token stays whole
    assert sis._width(sis._pad("王戎", 7)) == 7


def test_side_by_side_shows_the_new_turn_on_the_left_and_the_stop_on_the_right(sis, capsys):
    legacy = _row("王戎七岁。<|im_end|>\n<|im_start|>user\n请把", "max_new_tokens", None, 16, user_turn=True,
                  role_leak=True)
    ours = _row("王戎七岁，尝游。", "stop_id", "<|im_end|>", 9)
    sis.print_side_by_side({"legacy": [legacy], "packlora": [ours]}, 1, 80)
    lines = capsys.readouterr().out.splitlines()
    body = [line for line in lines if " │ " in line]
    left = [line.split(" │ ")[0].rstrip() for line in body]
    right = [line.split(" │ ", 1)[1] for line in body]
    assert left[3:] == ["王戎七岁。<|im_end|>↵", "<|im_start|>user↵", "请把", "… cut at max_new_tokens (16)",
                        "⚠ ran on into a new user turn"]
    assert right[3:5] == ["王戎七岁，尝游。", "■ stopped at <|im_end|>"]
    assert all(sis._width(line.split(" │ ")[0]) == 38 for line in body)  # (80 - 3) // 2 columns each


def test_summary_counts_new_turns_and_stops_at_the_end_of_turn_only(sis, capsys):
    legacy = [_row("a<|im_end|>\n<|im_start|>user\nb", "max_new_tokens", None, 9, user_turn=True, role_leak=True),
              _row("a<|im_end|>\n<|im_start|>system\nb", "max_new_tokens", None, 9, role_leak=True),
              _row("a", "max_new_tokens", None, 9)]
    ours = [_row("a", "stop_id", "<|im_end|>", 2), _row("a", "stop_id", "<|endoftext|>", 2),
            _row("a", "max_new_tokens", None, 9)]

    class Clock:
        phases = {"base": 1.0, "legacy": 30.0, "packlora": 30.0, "decoding": 6.0}
        wall, loads, start_load = 67.0, [1.5, 2.5], {"load_1_5_15": [1.5, 1.0, 1.0], "nproc": 2}

    class Base:
        path = Path("/nonexistent/stage1")

    runs = {k: sis.Run(k, Path("/x"), 30.0, 10, 5.0) for k in ("legacy", "packlora")}
    spec = sis.SPECS["quick"]
    assert sis.print_summary({"legacy": legacy, "packlora": ours}, runs, Base(), spec, Clock()) == (2, 1)
    out = capsys.readouterr().out
    assert "legacy, no stop ids: 2/3 replies ran on into a new turn (1/3 into a user turn)" in out
    assert "packlora, stop ids:  1/3 replies stopped at <|im_end|>" in out  # <|endoftext|> is not the end of turn
    assert "1/3 hit max_new_tokens" in out
    assert "legacy 0.5 min (10 steps, 0.50 s/step)" in out and "1-minute load average 1.5-2.5 on 2 CPUs" in out
