"""Runaway metrics: per-reply scores on hand-written replies, rates over scripted-model batches,
``packlora eval-runaway`` and ``decode --no-stop-ids`` on a checkpoint, and the stop-id round trip
from packlora.training to decoding."""
from __future__ import annotations

import json
import shutil

import pytest
from packlora.data_utils.chat_format import ChatFormat
from tiny_assets import ENDOFTEXT, IM_END, IM_START, scripted_lm

from packlora.decoding.generate import Reply, load_checkpoint
from packlora.decoding.runaway import (
    RepeatedUnit, evaluate_runaway, has_role_leak, naive_stop_ids, repeated_unit, score_reply, summarize,
)

A = [{"role": "user", "content": "Hello!"}]
B = [{"role": "user", "content": "The quick brown fox"}]


def _enc(tok, text):
    return tok.encode(text, add_special_tokens=False)


def _prompt(tok, messages):
    return tuple(_enc(tok, tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)))


def _reply(tok, ids, stop_id, max_new_tokens=10):
    text = tok.decode(ids, skip_special_tokens=False)
    if stop_id is None:
        return Reply(text, tuple(ids), "max_new_tokens", None, max_new_tokens)
    return Reply(text, tuple(ids), "stop_id", stop_id, len(ids) + 1)


@pytest.mark.parametrize("text, leak", [
    ("Hi!", False), ("Hi!\nuser\nMore", True), ("Hi!<|im_start|>", True), ("assistant\nHi", True),
    ("the user\nsaid", False), ("Hi!\nusers\n", False), ("Hi!\nsystem\n", True),
])
def test_role_leak_is_a_bare_role_line_or_im_start(text, leak):
    assert has_role_leak(text, "<|im_start|>") is leak


@pytest.mark.parametrize("reply, expected", [
    # a tiny model's greedy loop, cut mid-unit by max_new_tokens: 6 whole units + "何" = 19 chars
    ("王曰：何如？何如？何如？何如？何如？何如？何", RepeatedUnit("何如？", 6, 19)),
    # the shortest period wins: "王、王、" is also a period, "王、" is the unit
    ("谢公问曰：" + "王、" * 8, RepeatedUnit("王、", 8, 16)),
    # 12 characters of one character is a loop ...
    ("曰：" + "王" * 12, RepeatedUnit("王", 12, 12)),
    # ... 11 are not (min_chars 12), nor is natural repetition
    ("曰：" + "王" * 11, None),
    ("哈哈哈，妙哉！", None),
    ("孙秀既恨石崇不与绿珠，又憾潘岳昔遇之不以礼。", None),
    # a loop that ended before the reply did is not where the reply ends
    ("何如？" * 6 + "曰：善。", None),
    # an assistant-only model run on without stop ids: the unit is the tail's first period, which
    # starts inside the first answer's <|im_end|> ("<|im_end|>" precedes "何" as it follows "？")
    ("共载。<|im_end|>何如？<|im_end|>何如？<|im_end|>何如？<|im_end|>何如",
     RepeatedUnit("<|im_end|>何如？", 3, 10 + 3 * 13 + 2)),  # from the first <|im_end|> to the end
])
def test_repeated_unit_finds_the_unit_the_end_of_a_reply_repeats(reply, expected):
    assert repeated_unit(reply) == expected


def test_repeated_unit_thresholds_are_arguments():
    assert repeated_unit("曰：何如？何如？", min_repeats=2, min_chars=6) == RepeatedUnit("何如？", 2, 6)
    assert repeated_unit("曰：何如？何如？何如？", min_repeats=4) is None


def test_never_ending_reply_is_a_loop_and_names_its_unit_but_a_new_turn_is_a_role_leak(chatml_tokenizer):
    loop = score_reply(_reply(chatml_tokenizer, _enc(chatml_tokenizer, "ab ab ab ab ab ab ab"), None), "ab", ChatFormat(chatml_tokenizer))
    assert (loop.hit_max_new_tokens, loop.role_leak, loop.loop, loop.runaway, loop.repeated_unit) == (
        True, False, True, True, "ab ")
    ids = [*_enc(chatml_tokenizer, "Hi"), IM_END, *_enc(chatml_tokenizer, "\n"), IM_START, *_enc(chatml_tokenizer, "user\nMore")]
    leak = score_reply(_reply(chatml_tokenizer, ids, None), "Hi", ChatFormat(chatml_tokenizer))
    assert (leak.hit_max_new_tokens, leak.role_leak, leak.loop, leak.runaway) == (True, True, False, True)
    ended = score_reply(_reply(chatml_tokenizer, _enc(chatml_tokenizer, "ab ab ab ab ab ab ab"), IM_END), "ab", ChatFormat(chatml_tokenizer))
    assert (ended.loop, ended.runaway, ended.repeated_unit) == (False, False, None)  # it ended: no loop


def test_reply_stopped_at_im_end_emitted_end_of_turn_and_did_not_run_away(chatml_tokenizer):
    r = score_reply(_reply(chatml_tokenizer, _enc(chatml_tokenizer, "Hi there."), IM_END), "Hi there!!", ChatFormat(chatml_tokenizer))
    assert (r.stopped_by_stop_id, r.emitted_end_of_turn, r.hit_max_new_tokens, r.role_leak, r.runaway) == (
        True, True, False, False, False)
    assert r.length_ratio == 9 / 10  # "Hi there." vs "Hi there!!"


def test_reply_running_into_a_new_turn_leaks_a_role_whether_special_tokens_show_or_not(chatml_tokenizer):
    ids = [*_enc(chatml_tokenizer, "Hi"), IM_END, *_enc(chatml_tokenizer, "\n"), IM_START, *_enc(chatml_tokenizer, "user\nMore")]
    r = score_reply(_reply(chatml_tokenizer, ids, ENDOFTEXT), "Hi", ChatFormat(chatml_tokenizer))
    # <|im_end|> came first, right after "Hi": training taught the end of turn; the decoder ignored it
    assert (r.emitted_end_of_turn, r.role_leak, r.runaway, r.stopped_by_stop_id) == (True, True, True, True)
    assert r.length_ratio == len("Hi\nuser\nMore") / 2  # visible text skips special tokens


def test_bare_role_line_without_special_tokens_is_a_leak_and_no_end_of_turn(chatml_tokenizer):
    ids = _enc(chatml_tokenizer, "Hi\nuser\nMore")
    r = score_reply(_reply(chatml_tokenizer, ids, None), None, ChatFormat(chatml_tokenizer))
    assert (r.emitted_end_of_turn, r.role_leak, r.hit_max_new_tokens, r.runaway, r.length_ratio) == (
        False, True, True, True, None)


def test_im_start_before_im_end_is_not_an_end_of_turn(chatml_tokenizer):
    ids = [*_enc(chatml_tokenizer, "Hi"), IM_START, *_enc(chatml_tokenizer, "user\n")]
    assert score_reply(_reply(chatml_tokenizer, ids, IM_END), "Hi", ChatFormat(chatml_tokenizer)).emitted_end_of_turn is False


def test_summary_rates_and_worst_first(chatml_tokenizer):
    good = score_reply(_reply(chatml_tokenizer, _enc(chatml_tokenizer, "Hi"), IM_END), "Hi", ChatFormat(chatml_tokenizer), "f:1")
    long = score_reply(_reply(chatml_tokenizer, _enc(chatml_tokenizer, "Hi Hi Hi Hi"), None), "Hi", ChatFormat(chatml_tokenizer), "f:2")
    leak = score_reply(_reply(chatml_tokenizer, _enc(chatml_tokenizer, "Hi\nuser\n"), ENDOFTEXT), "Hi", ChatFormat(chatml_tokenizer), "f:3")
    report = summarize([good, long, leak, good], stop_ids=[IM_END], max_new_tokens=10, no_stop_ids=False)
    assert (report.stopped_by_stop_id, report.emitted_end_of_turn, report.hit_max_new_tokens, report.role_leak,
            report.loop, report.runaway) == (0.75, 0.5, 0.25, 0.25, 0.25, 0.5)
    # "Hi" 2/2; "Hi Hi Hi Hi" 11/2; "Hi\nuser\n" strips to "Hi\nuser", 7/2; "Hi" 2/2
    assert report.mean_length_ratio == pytest.approx((1 + 5.5 + 3.5 + 1) / 4)
    assert [w["source"] for w in report.worst] == ["f:2", "f:3", "f:1", "f:1"]
    assert report.scalars()["runaway/runaway"] == 0.5 and report.scalars()["runaway/loop"] == 0.25


def test_no_stop_ids_lets_a_model_that_ends_its_turn_run_on(chatml_tokenizer):
    script = [*_enc(chatml_tokenizer, "Hi"), IM_END, *_enc(chatml_tokenizer, "\n"), IM_START, *_enc(chatml_tokenizer, "user\n"),
              ENDOFTEXT]
    model = scripted_lm(len(chatml_tokenizer), {_prompt(chatml_tokenizer, A): script}, filler=ENDOFTEXT)
    prompts = [(A, "Hi", "a:1")]
    with_stops = evaluate_runaway(model, ChatFormat(chatml_tokenizer), prompts, [IM_END, ENDOFTEXT], max_new_tokens=20)
    naive = evaluate_runaway(model, ChatFormat(chatml_tokenizer), prompts, [IM_END, ENDOFTEXT], max_new_tokens=20, no_stop_ids=True)
    assert naive_stop_ids(ChatFormat(chatml_tokenizer)) == [ENDOFTEXT] and naive.stop_ids == [ENDOFTEXT]
    assert (with_stops.runaway, with_stops.emitted_end_of_turn, with_stops.mean_length_ratio) == (0.0, 1.0, 1.0)
    assert (naive.runaway, naive.role_leak, naive.emitted_end_of_turn) == (1.0, 1.0, 1.0)


def test_model_that_never_ends_hits_max_new_tokens_either_way(chatml_tokenizer):
    model = scripted_lm(len(chatml_tokenizer), {}, filler=_enc(chatml_tokenizer, "a")[0])
    report = evaluate_runaway(model, ChatFormat(chatml_tokenizer), [(A, "Hi", "a:1"), (B, "x", "b:1")], [IM_END], max_new_tokens=4)
    assert (report.hit_max_new_tokens, report.runaway, report.emitted_end_of_turn) == (1.0, 1.0, 0.0)
    assert report.mean_length_ratio == pytest.approx((4 / 2 + 4 / 1) / 2)


# ----------------------------------------------------------------------------- CLI and checkpoints


def _held_out(tmp_path):
    path = tmp_path / "held.jsonl"
    rows = [{"messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."}]},
            {"messages": [{"role": "user", "content": "The quick brown fox"}, {"role": "assistant", "content": "ok"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_runaway_cli_writes_the_report(adapter_ckpt, tmp_path, capsys):
    from packlora.decoding.eval_cli import main

    out = tmp_path / "r.json"
    assert main([str(adapter_ckpt[0] / "ckpt"), "--input", str(_held_out(tmp_path)), "--output", str(out),
                 "--max-new-tokens", "6"]) == 0
    report = json.loads(out.read_text())
    assert report["num_prompts"] == 2 and report["stop_ids"] == [IM_END, ENDOFTEXT] and not report["no_stop_ids"]
    for key in ("stopped_by_stop_id", "emitted_end_of_turn", "hit_max_new_tokens", "role_leak", "runaway"):
        assert report[key] in (0.0, 0.5, 1.0)
    assert len(report["worst"]) == 2 and "runaway" in capsys.readouterr().out

    assert main([str(adapter_ckpt[0] / "ckpt"), "--input", str(_held_out(tmp_path)), "--output", str(out),
                 "--max-new-tokens", "6", "--no-stop-ids"]) == 0
    assert "EXPERIMENT ONLY" in capsys.readouterr().err
    assert json.loads(out.read_text())["stop_ids"] == [ENDOFTEXT]


def test_eval_runaway_cli_samples_with_qwens_settings_and_records_them(adapter_ckpt, tmp_path, capsys):
    from packlora.decoding.eval_cli import main

    out, held = tmp_path / "r.json", _held_out(tmp_path)
    qwen = ["--do-sample", "--temperature", "0.7", "--top-p", "0.8", "--top-k", "20", "--repetition-penalty", "1.05"]
    runs = []
    for seed in ("0", "0", "1"):
        assert main([str(adapter_ckpt[0] / "ckpt"), "--input", str(held), "--output", str(out), "--max-new-tokens",
                     "8", *qwen, "--seed", seed]) == 0
        runs.append(json.loads(out.read_text()))
    assert runs[0]["decoding"] == {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                   "repetition_penalty": 1.05, "seed": 0}
    assert runs[0]["worst"] == runs[1]["worst"]  # same seed, same replies
    assert "loop" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        main([str(adapter_ckpt[0] / "ckpt"), "--input", str(held), "--output", str(out), "--top-p", "0.8"])
    assert exit_info.value.code == 2 and "--top-p only apply with --do-sample" in capsys.readouterr().err


def test_eval_runaway_cli_reports_a_missing_input(adapter_ckpt, tmp_path, capsys):
    from packlora.decoding.eval_cli import main

    assert main([str(adapter_ckpt[0] / "ckpt"), "--input", str(tmp_path / "no.jsonl"), "--output",
                 str(tmp_path / "r.json")]) == 1
    assert "prompt file (--input) does not exist" in capsys.readouterr().err


def test_decode_no_stop_ids_says_so_and_stops_at_eos_only(adapter_ckpt, tmp_path, caplog):
    from packlora.decoding.cli import main

    with caplog.at_level("WARNING"):
        assert main([str(adapter_ckpt[0] / "ckpt"), "--input", str(_held_out(tmp_path)), "--output",
                     str(tmp_path / "o.jsonl"), "--max-new-tokens", "4", "--no-stop-ids"]) == 0
    assert "EXPERIMENT ONLY" in caplog.text and "2 '<|im_end|>'" in caplog.text


def test_stop_ids_written_at_training_time_are_used_at_decoding_time(adapter_ckpt, tmp_path, chatml_tokenizer):
    from packlora.core.checkpoint import write_extras

    fmt = ChatFormat(chatml_tokenizer)
    ckpt_dir = tmp_path / "ckpt"
    shutil.copytree(adapter_ckpt[0] / "ckpt", ckpt_dir)
    (ckpt_dir / "generation_config.json").unlink()
    for stop_tokens, expected in ((["<|endoftext|>", "<|im_end|>"], (ENDOFTEXT, IM_END)),
                                  (["<|im_end|>", "!"], (IM_END, chatml_tokenizer.get_vocab()["!"], ENDOFTEXT))):
        written = [fmt.token_id(t) for t in stop_tokens]  # what training writes: the tokens, in order
        config = {"decoding": {"stop_tokens": stop_tokens, "max_new_tokens": 11}}
        write_extras(ckpt_dir, chatml_tokenizer, config, written, fmt.pad_id(written), 11)
        assert json.loads((ckpt_dir / "generation_config.json").read_text())["eos_token_id"] == written
        ckpt = load_checkpoint(ckpt_dir)
        # the written ids, in their order, then the tokenizer's own end-of-turn/eos if missing
        assert ckpt.stop_ids == expected and ckpt.stop_ids[: len(written)] == tuple(written)


def test_eval_runaway_measures_the_decode_of_the_same_preset_and_stop_strings(adapter_ckpt, tmp_path):
    """``--preset`` and ``--stop-string`` (shared with ``packlora decode``): eval-runaway scores exactly
    the replies ``decode`` writes with the same flags. The stop string is cut out of a plain decode's
    reply, so it really fires."""
    from packlora.decoding.cli import main as decode
    from packlora.decoding.eval_cli import main as eval_runaway

    ckpt, held = str(adapter_ckpt[0] / "ckpt"), _held_out(tmp_path)
    common = ["--input", str(held), "--max-new-tokens", "12", "--preset", "zhang_henshui"]
    assert decode([ckpt, *common, "--output", str(tmp_path / "plain.jsonl")]) == 0
    reply = json.loads((tmp_path / "plain.jsonl").read_text().splitlines()[0])["reply"]
    assert len(reply) >= 6, reply
    stop = reply[3:5]
    flags = [*common, "--stop-string", stop]
    assert decode([ckpt, *flags, "--output", str(tmp_path / "cut.jsonl")]) == 0
    assert eval_runaway([ckpt, *flags, "--output", str(tmp_path / "r.json")]) == 0

    decoded = {r["source"]: (r["reply"], r["stop_reason"]) for r in map(json.loads, (tmp_path / "cut.jsonl").open())}
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["preset"], report["stop_strings"]) == ("zhang_henshui", [stop])
    assert {w["source"]: (w["reply"], w["stop_reason"]) for w in report["worst"]} == decoded
    cut, why = decoded[f"{held}:1"]
    assert why == "stop_string" and reply.startswith(cut) and len(cut) <= 3
