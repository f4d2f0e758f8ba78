"""Stop behaviour with scripted-logit models (no training): stop ids alone and in batches, and
multi-token stop strings, overlapping partial matches included."""
from __future__ import annotations

import doctest

import pytest
import torch
from packlora.data_utils.chat_format import ChatFormat
from tiny_assets import ENDOFTEXT, IM_END, IM_START, scripted_lm

import packlora.decoding.stop_strings
from packlora.decoding.generate import Reply, generate_replies
from packlora.decoding.stop_strings import StopAwareStreamer, StopStringMatcher, StringStop

A = [{"role": "user", "content": "Hello!"}]
B = [{"role": "user", "content": "The quick brown fox"}]
C = [{"role": "system", "content": "You are a scholar."}, {"role": "user", "content": "Once upon a time"}]


def _prompt(tok, messages) -> tuple[int, ...]:
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tuple(tok.encode(text, add_special_tokens=False))


def _enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


# ----------------------------------------------------------------------------- matcher, pure text


def test_earliest_occurrence_wins_and_longest_on_a_tie():
    m = StopStringMatcher(["user\n", "\nuser\n", "xyz"])
    assert m.find("ok\nuser\nxyz") == (2, "\nuser\n")
    assert m.find("ok") is None


def test_overlapping_partial_match_is_found():
    # a per-character state machine that resets on mismatch sees "aa" then "a" != "b" and misses it
    assert StopStringMatcher(["aab"]).find("aaab") == (1, "aab")
    assert StopStringMatcher(["abab"]).find("abaabab") == (3, "abab")


def test_holdback_is_the_longest_suffix_that_may_still_become_a_stop():
    m = StopStringMatcher(["\nuser\n", "<|im_start|>"])
    assert m.holdback("Hi!\nus") == 3
    assert m.holdback("Hi!<|im") == 4
    assert m.holdback("Hi!") == 0
    assert m.holdback("Hi!\nuser") == 5  # one character short of the stop


def test_first_stop_replays_a_stream_whose_stop_ends_mid_token():
    pieces = ["Hi", "!\nus", "er\nXY", "Z"]  # the stop "\nuser\n" starts and ends inside tokens
    stop = StopStringMatcher(["\nuser\n"]).first_stop(list(range(4)), lambda ids: "".join(pieces[i] for i in ids))
    assert stop == StringStop(num_tokens=3, text="Hi!", kept_tokens=1, stop_string="\nuser\n")


def test_bad_stop_strings_raise_naming_the_value():
    with pytest.raises(ValueError, match="list of strings"):
        StopStringMatcher("\nuser\n")
    with pytest.raises(ValueError, match="non-empty string, got ''"):
        StopStringMatcher(["ok", ""])


def test_docstring_examples():
    result = doctest.testmod(packlora.decoding.stop_strings)
    assert result.attempted >= 5 and result.failed == 0


# ----------------------------------------------------------------------------- scripted generation


@pytest.fixture
def runaway_script(chatml_tokenizer):
    """Prompt A -> ``Hello!<|im_end|><|im_start|>user\\n!<|endoftext|>`` (a model running on)."""
    return [*_enc(chatml_tokenizer, "Hello!"), IM_END, IM_START, *_enc(chatml_tokenizer, "user\n!"), ENDOFTEXT]


@pytest.mark.parametrize(
    "stop_id_text, expected_text, expected_new",
    [("<|im_end|>", "Hello!", 5), ("<|im_start|>", "Hello!<|im_end|>", 6), ("<|endoftext|>", None, None)],
)
def test_each_stop_id_alone_ends_the_reply_before_it(chatml_tokenizer, runaway_script, stop_id_text, expected_text,
                                                     expected_new):
    stop_id = chatml_tokenizer.convert_tokens_to_ids(stop_id_text)
    model = scripted_lm(len(chatml_tokenizer), {_prompt(chatml_tokenizer, A): runaway_script}, filler=ENDOFTEXT)
    [reply] = generate_replies(model, ChatFormat(chatml_tokenizer), [A], stop_ids=[stop_id], max_new_tokens=30)
    if expected_text is None:  # <|endoftext|> alone: the reply ran on through the invented turn
        expected_text = "Hello!<|im_end|><|im_start|>user\n!"
        expected_new = len(runaway_script)
    assert reply.text == expected_text
    assert reply.stop_reason == "stop_id" and reply.stop_id == stop_id and reply.num_new_tokens == expected_new
    assert list(reply.token_ids) == runaway_script[: expected_new - 1]


def test_rows_of_a_batch_stop_at_different_steps_on_different_stop_ids(chatml_tokenizer):
    scripts = {
        _prompt(chatml_tokenizer, A): [*_enc(chatml_tokenizer, "Hi"), IM_END],                          # stops at step 3
        _prompt(chatml_tokenizer, B): [*_enc(chatml_tokenizer, "jumps."), ENDOFTEXT],                   # at step 5
        _prompt(chatml_tokenizer, C): _enc(chatml_tokenizer, "there lived a scholar who loved wine"),  # never
    }
    assert [len(_enc(chatml_tokenizer, s)) for s in ("Hi", "jumps.")] == [2, 4]  # "H" "i"; 4 tokens
    model = scripted_lm(len(chatml_tokenizer), scripts, filler=ENDOFTEXT)
    replies = generate_replies(model, ChatFormat(chatml_tokenizer), [A, B, C], stop_ids=[IM_END, ENDOFTEXT], max_new_tokens=6)
    assert [(r.text, r.stop_reason, r.stop_id, r.num_new_tokens) for r in replies] == [
        ("Hi", "stop_id", IM_END, 3),
        ("jumps.", "stop_id", ENDOFTEXT, 5),
        (chatml_tokenizer.decode(scripts[_prompt(chatml_tokenizer, C)][:6]), "max_new_tokens", None, 6),
    ]


def test_stop_string_spanning_several_tokens_cuts_the_reply_before_it(chatml_tokenizer):
    written = [*_enc(chatml_tokenizer, "Hello!"), *_enc(chatml_tokenizer, "\n"), *_enc(chatml_tokenizer, "user"),
               *_enc(chatml_tokenizer, "\n"), *_enc(chatml_tokenizer, "more")]
    model = scripted_lm(len(chatml_tokenizer), {_prompt(chatml_tokenizer, A): written}, filler=ENDOFTEXT)
    [reply] = generate_replies(model, ChatFormat(chatml_tokenizer), [A], stop_ids=[IM_END], max_new_tokens=30,
                               stop_strings=["\nuser\n"])
    n_hello, n_user = len(_enc(chatml_tokenizer, "Hello!")), len(_enc(chatml_tokenizer, "user"))
    assert reply == Reply(text="Hello!", token_ids=tuple(written[:n_hello]), stop_reason="stop_string",
                          stop_id=None, num_new_tokens=n_hello + 1 + n_user + 1, stop_string="\nuser\n")


@pytest.mark.parametrize("configured, passed", [(["\nuser\n"], []), ("\nuser\n", []), (["\nuser\n"], ["zz"])],
                         ids=["list", "one-string", "with-the-run's-own"])
def test_stop_strings_of_the_models_generation_config_are_honoured_without_a_tokenizer_argument(
        chatml_tokenizer, configured, passed):
    """A base whose ``generation_config.json`` lists ``stop_strings``: transformers refused to
    generate ("could not locate a tokenizer") unless ``tokenizer=`` was passed; now the decoder passes
    it and cuts the reply at the base's stop string like at its own."""
    written = [*_enc(chatml_tokenizer, "Hello!"), *_enc(chatml_tokenizer, "\n"), *_enc(chatml_tokenizer, "user"),
               *_enc(chatml_tokenizer, "\n"), *_enc(chatml_tokenizer, "more")]
    model = scripted_lm(len(chatml_tokenizer), {_prompt(chatml_tokenizer, A): written}, filler=ENDOFTEXT)
    model.generation_config.stop_strings = configured
    [reply] = generate_replies(model, ChatFormat(chatml_tokenizer), [A], stop_ids=[IM_END], max_new_tokens=30,
                               stop_strings=passed)
    n_hello, n_user = len(_enc(chatml_tokenizer, "Hello!")), len(_enc(chatml_tokenizer, "user"))
    assert reply == Reply(text="Hello!", token_ids=tuple(written[:n_hello]), stop_reason="stop_string",
                          stop_id=None, num_new_tokens=n_hello + 1 + n_user + 1, stop_string="\nuser\n")


def test_overlapping_partial_match_stops_generation(chatml_tokenizer):
    a, b = _enc(chatml_tokenizer, "a"), _enc(chatml_tokenizer, "b")
    assert len(a) == len(b) == 1
    model = scripted_lm(len(chatml_tokenizer), {_prompt(chatml_tokenizer, A): a * 3 + b + a * 5}, filler=ENDOFTEXT)
    [reply] = generate_replies(model, ChatFormat(chatml_tokenizer), [A], stop_ids=[IM_END], max_new_tokens=20, stop_strings=["aab"])
    assert (reply.text, reply.token_ids, reply.num_new_tokens) == ("a", tuple(a), 4)


def test_im_start_stop_string_catches_the_special_token(chatml_tokenizer, runaway_script):
    # no <|im_end|> stop id: the string "<|im_start|>" still ends the reply at the invented turn
    model = scripted_lm(len(chatml_tokenizer), {_prompt(chatml_tokenizer, A): runaway_script}, filler=ENDOFTEXT)
    [reply] = generate_replies(model, ChatFormat(chatml_tokenizer), [A], stop_ids=[ENDOFTEXT], max_new_tokens=30,
                               stop_strings=["<|im_start|>"])
    assert (reply.text, reply.stop_reason, reply.num_new_tokens) == ("Hello!<|im_end|>", "stop_string", 6)


def test_stop_strings_end_rows_of_a_batch_at_different_steps(chatml_tokenizer):
    scripts = {
        _prompt(chatml_tokenizer, A): [*_enc(chatml_tokenizer, "Hi\nuser\n"), *_enc(chatml_tokenizer, "xx")],
        _prompt(chatml_tokenizer, B): [*_enc(chatml_tokenizer, "jumps.\nsystem\nyy")],
    }
    model = scripted_lm(len(chatml_tokenizer), scripts, filler=ENDOFTEXT)
    replies = generate_replies(model, ChatFormat(chatml_tokenizer), [A, B], stop_ids=[IM_END], max_new_tokens=30,
                               stop_strings=["\nuser\n", "\nsystem\n"])
    assert [(r.text, r.stop_string) for r in replies] == [("Hi", "\nuser\n"), ("jumps.", "\nsystem\n")]


def test_streamer_shows_the_reply_and_never_a_stop_or_its_prefix(chatml_tokenizer):
    written = [*_enc(chatml_tokenizer, "Hello!"), *_enc(chatml_tokenizer, "\nuser\n"), *_enc(chatml_tokenizer, "more")]
    model = scripted_lm(len(chatml_tokenizer), {_prompt(chatml_tokenizer, A): written}, filler=ENDOFTEXT)
    pieces: list[str] = []
    streamer = StopAwareStreamer(chatml_tokenizer, [IM_END], StopStringMatcher(["\nuser\n"]), write=pieces.append)
    [reply] = generate_replies(model, ChatFormat(chatml_tokenizer), [A], stop_ids=[IM_END], max_new_tokens=30,
                               stop_strings=["\nuser\n"], streamer=streamer, batch_size=1)
    assert reply.text == "Hello!"
    assert "".join(pieces) == "Hello!\n"  # the reply, then end()'s newline; no "\n" of the stop shown
    assert all("user" not in p for p in pieces)


def test_streamer_stops_showing_at_a_stop_id(chatml_tokenizer, runaway_script):
    model = scripted_lm(len(chatml_tokenizer), {_prompt(chatml_tokenizer, A): runaway_script}, filler=ENDOFTEXT)
    pieces: list[str] = []
    streamer = StopAwareStreamer(chatml_tokenizer, [IM_END], write=pieces.append)
    generate_replies(model, ChatFormat(chatml_tokenizer), [A], stop_ids=[IM_END], max_new_tokens=30, streamer=streamer, batch_size=1)
    assert "".join(pieces) == "Hello!\n"


def test_streaming_needs_batch_size_one(chatml_tokenizer, runaway_script):
    model = scripted_lm(len(chatml_tokenizer), {_prompt(chatml_tokenizer, A): runaway_script}, filler=ENDOFTEXT)
    with pytest.raises(ValueError, match="batch_size=1"):
        generate_replies(model, ChatFormat(chatml_tokenizer), [A, B], stop_ids=[IM_END], streamer=object(), batch_size=2)


def test_decode_cli_streams_exactly_the_replies_it_writes(tmp_path, capsys):
    """A random tiny model: whatever it writes, the stream shows each reply as written to the file,
    cut before the stop string "e"."""
    import json

    from transformers import GenerationConfig

    from tiny_assets import build_chatml_tokenizer, tiny_model

    from packlora.decoding.cli import main

    tok = build_chatml_tokenizer(tmp_path / "ckpt")
    tiny_model(len(tok), initializer_range=1.0, tie_word_embeddings=False).save_pretrained(tmp_path / "ckpt")
    GenerationConfig(eos_token_id=[IM_END, ENDOFTEXT]).save_pretrained(tmp_path / "ckpt")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (A, B)))
    out = tmp_path / "o.jsonl"
    assert main([str(tmp_path / "ckpt"), "--input", str(prompts), "--output", str(out), "--max-new-tokens", "12",
                 "--stream", "--stop-string", "e"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    shown = capsys.readouterr().out
    expected = "".join(f"--- {r['source']}\n{r['reply']}\n" for r in rows)
    assert expected in shown, (expected, shown[-600:])
    assert all("e" not in r["reply"] and "stop_string" in r for r in rows)


@pytest.mark.parametrize("text, stops", [
    ("答案。龘龘\nuser\n更多", ["龘龘"]),  # 龘 is two byte-level tokens: the stop completes mid-character pair
    ("答案。龘龘\nuser\n更多", ["\nuser\n"]),
    ("答案。龘龘\nuser\n更多", ["。龘", "user"]),  # the earlier one wins
    ("xaaab yes", ["aab"]),  # overlapping partial match ("aa" then "aab")
    ("Hi!<|im_start|>user", ["<|im_start|>"]),  # a special token's text, written as ordinary tokens
])
def test_transformers_stops_at_the_token_where_the_matcher_first_sees_the_stop(qwen2_tokenizer, text, stops):
    from transformers.generation.stopping_criteria import StopStringCriteria as HFStopStringCriteria

    ids = qwen2_tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    decode = lambda xs: qwen2_tokenizer.decode(list(xs), skip_special_tokens=False)  # noqa: E731
    hit = StopStringMatcher(stops).first_stop(ids, decode)
    criterion = HFStopStringCriteria(qwen2_tokenizer, stops)
    first = next(n for n in range(1, len(ids) + 1) if criterion(torch.tensor([ids[:n]]), None)[0])
    assert hit is not None and first == hit.num_tokens
    assert text.startswith(hit.text) and text[len(hit.text):].startswith(hit.stop_string)


def test_decode_cli_honours_the_stop_strings_of_the_bases_generation_config(tmp_path, capsys):
    """``packlora decode`` of an adapter whose base lists ``stop_strings: ["e"]`` in its
    ``generation_config.json`` (the checkpoint's own lists none): no crash, and every reply is cut
    before the first "e", streamed or not."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig

    from tiny_assets import build_chatml_tokenizer, tiny_model

    from packlora.decoding.cli import main

    tok = build_chatml_tokenizer(tmp_path / "ckpt")
    base = tiny_model(len(tok), initializer_range=1.0, tie_word_embeddings=False)
    base.generation_config = GenerationConfig(eos_token_id=ENDOFTEXT, stop_strings=["e"])
    base.save_pretrained(tmp_path / "base_model")
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "ckpt")
    GenerationConfig(eos_token_id=[IM_END, ENDOFTEXT]).save_pretrained(tmp_path / "ckpt")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (A, B, C)))
    for extra in ([], ["--stream", "--batch-size", "1"]):
        out = tmp_path / "o.jsonl"
        assert main([str(tmp_path / "ckpt"), "--input", str(prompts), "--output", str(out), "--max-new-tokens", "12",
                     *extra]) == 0
        rows = [json.loads(x) for x in out.read_text().splitlines()]
        assert all("e" not in r["reply"] for r in rows)
        assert [r["stop_string"] for r in rows if r["stop_reason"] == "stop_string"] != []
        assert all(r["stop_string"] == "e" for r in rows if r["stop_reason"] == "stop_string")
        if extra:
            assert "".join(f"--- {r['source']}\n{r['reply']}\n" for r in rows) in capsys.readouterr().out
