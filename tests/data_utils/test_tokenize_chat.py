"""Assistant-only labels: exact tensors written by hand for the real Qwen2 tokenizer."""
import pytest

from data_utils.tokenize_chat import TemplateMismatchError, end_of_turn_id, tokenize_chat
from data_utils.types import IGNORE_INDEX as X

# Real Qwen2 ids (../shared/assets/qwen2-tokenizer)
IM_START, IM_END, NL = 151644, 151645, 198
SYSTEM, USER, ASSISTANT = 8948, 872, 77091
DEFAULT_SYSTEM = [2610, 525, 264, 10950, 17847]  # "You are a helpful assistant"
HELLO = [9707, 0]  # "Hello!"
HI_THERE = [13048, 1052, 13]  # "Hi there."


def test_two_turn_chat_trains_only_replies_and_their_im_end(qwen2_tokenizer):
    chat = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi there."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi there."},
    ]
    seg = tokenize_chat(chat, qwen2_tokenizer, end_of_turn_id(qwen2_tokenizer))
    expected_ids = (
        [IM_START, SYSTEM, NL, *DEFAULT_SYSTEM, IM_END, NL]
        + [IM_START, USER, NL, *HELLO, IM_END, NL]
        + [IM_START, ASSISTANT, NL, *HI_THERE, IM_END, NL]
        + [IM_START, USER, NL, *HELLO, IM_END, NL]
        + [IM_START, ASSISTANT, NL, *HI_THERE, IM_END, NL]
    )
    expected_labels = (
        [X, X, X, X, X, X, X, X, X, X]  # system turn (template's default prompt)
        + [X, X, X, X, X, X, X]  # user turn, header included
        + [X, X, X, 13048, 1052, 13, IM_END, X]  # assistant header -100; reply + <|im_end|> trained; "\n" not
        + [X, X, X, X, X, X, X]
        + [X, X, X, 13048, 1052, 13, IM_END, X]
    )
    assert list(seg.input_ids) == expected_ids
    assert list(seg.labels) == expected_labels


def test_system_message_and_its_header_are_never_trained(qwen2_tokenizer):
    chat = [
        {"role": "system", "content": "Hi there."},
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hello!"},
    ]
    seg = tokenize_chat(chat, qwen2_tokenizer, IM_END)
    assert list(seg.input_ids[:8]) == [IM_START, SYSTEM, NL, *HI_THERE, IM_END, NL]
    trained = [i for i, lab in zip(seg.input_ids, seg.labels) if lab != X]
    assert trained == [*HELLO, IM_END]


def test_end_of_turn_is_im_end_even_though_eos_is_endoftext(qwen2_tokenizer):
    assert qwen2_tokenizer.eos_token == "<|endoftext|>"
    assert end_of_turn_id(qwen2_tokenizer) == IM_END


def test_tiny_tokenizer_masks_every_role_header(chatml_tokenizer):
    chat = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Once upon a time"},
        {"role": "assistant", "content": "there lived a scholar."},
    ]
    seg = tokenize_chat(chat, chatml_tokenizer, end_of_turn_id(chatml_tokenizer))
    trained = chatml_tokenizer.decode([i for i, lab in zip(seg.input_ids, seg.labels) if lab != X])
    assert trained == "Hi.<|im_end|>there lived a scholar.<|im_end|>"
    assert end_of_turn_id(chatml_tokenizer) == 2


class _RewritingTemplate:
    """Wraps a tokenizer whose template renders the last turn differently (like "thinking"
    templates that strip earlier reasoning): the prefix is not a token prefix."""

    def __init__(self, tok):
        self.tok = tok

    def __call__(self, *a, **k):
        return self.tok(*a, **k)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        return text if add_generation_prompt else text.replace("Hello!", "Hello?")


def test_template_whose_prefix_is_not_a_token_prefix_raises_naming_the_example(qwen2_tokenizer):
    chat = [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi there."}]
    with pytest.raises(TemplateMismatchError, match=r"data\.jsonl:7.*not a token prefix"):
        tokenize_chat(chat, _RewritingTemplate(qwen2_tokenizer), IM_END, example="data.jsonl:7")
