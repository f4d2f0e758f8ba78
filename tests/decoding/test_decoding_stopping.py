from __future__ import annotations

import doctest

import pytest
from decoding_testutils import QWEN2_TOKENIZER, REPO_ROOT

import decoding.stopping
from decoding.stopping import cut_at_first_stop, resolve_stop_ids

IM_END, ENDOFTEXT = 151645, 151643  # Qwen2 ids, from shared/README.md


@pytest.fixture(scope="module")
def qwen2_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN2_TOKENIZER)


def test_generation_config_order_is_kept_and_duplicates_dropped(qwen2_tok):
    assert resolve_stop_ids(qwen2_tok, {"eos_token_id": [IM_END, ENDOFTEXT]}) == [IM_END, ENDOFTEXT]


def test_im_end_is_added_when_generation_config_only_has_endoftext(qwen2_tok):
    from transformers import GenerationConfig

    assert resolve_stop_ids(qwen2_tok, GenerationConfig(eos_token_id=ENDOFTEXT)) == [ENDOFTEXT, IM_END]


def test_without_generation_config_tokenizer_stops_are_used(qwen2_tok):
    # eos_token of the Qwen2 *base* tokenizer is <|endoftext|>; <|im_end|> comes first regardless.
    assert resolve_stop_ids(qwen2_tok) == [IM_END, ENDOFTEXT]


def test_single_token_stop_string_is_appended(qwen2_tok):
    assert resolve_stop_ids(qwen2_tok, {"eos_token_id": IM_END}, stop_tokens=["<|endoftext|>", "\n\n"]) == [
        IM_END,
        ENDOFTEXT,
        271,  # "ĊĊ" in the Qwen2 vocabulary
    ]


def test_multi_token_stop_string_raises_naming_it(qwen2_tok):
    with pytest.raises(ValueError, match=r"'###END###' is 3 tokens \[14374, 4689, 14374\].*exactly one token"):
        resolve_stop_ids(qwen2_tok, {"eos_token_id": IM_END}, stop_tokens=["###END###"])


def test_stop_tokens_given_as_a_bare_string_raises(qwen2_tok):
    with pytest.raises(ValueError, match="list of strings"):
        resolve_stop_ids(qwen2_tok, stop_tokens="<|im_end|>")


class _NoStopTokenizer:
    eos_token_id = None

    def get_vocab(self):
        return {"a": 0, "b": 1}


def test_no_stop_id_anywhere_raises():
    with pytest.raises(ValueError, match="no stop ids.*decoding.stop_tokens"):
        resolve_stop_ids(_NoStopTokenizer(), {"eos_token_id": None})


def test_cut_keeps_tokens_before_the_first_stop_only():
    assert cut_at_first_stop([7, 8, 0, 9, 2], [2, 0]) == ((7, 8), 0)
    assert cut_at_first_stop([2, 7], [2]) == ((), 2)
    assert cut_at_first_stop([], [2]) == ((), None)


def test_docstring_examples(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the examples load ../shared/assets/qwen2-tokenizer
    result = doctest.testmod(decoding.stopping)
    assert result.attempted >= 5 and result.failed == 0
