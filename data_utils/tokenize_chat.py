"""Chat -> ``Segment`` with assistant-only labels, using the tokenizer's own chat template.

Only assistant replies and the end-of-turn token that closes them are trained. System and user
text, every ``<|im_start|>role\\n`` header, and the newline after ``<|im_end|>`` get ``IGNORE_INDEX``.
For a 2-turn ChatML chat (``·`` = label -100, ``^`` = trained)::

    <|im_start|>system\\nS<|im_end|>\\n<|im_start|>user\\nU1<|im_end|>\\n<|im_start|>assistant\\nA1<|im_end|>\\n ...
    ·············································································^^^^^^^^^^^^·
    ... <|im_start|>user\\nU2<|im_end|>\\n<|im_start|>assistant\\nA2<|im_end|>\\n
        ·································································^^^^^^^^^^^^·

How boundaries are found (no ``{% generation %}`` tags needed): for assistant message ``i`` the
template renders ``messages[:i]`` with ``add_generation_prompt=True`` (ends with the assistant
header) and ``messages[:i+1]`` (ends after the reply's turn). Both must be *token* prefixes of the
full conversation; the reply is everything between them, up to and including the last
end-of-turn token. If a template renders a prefix that is not a token prefix (e.g. templates that
rewrite earlier turns), ``TemplateMismatchError`` names the example: the mask is never shifted.
"""
from __future__ import annotations

from typing import Sequence

from data_utils.types import IGNORE_INDEX, Segment

END_OF_TURN_TOKEN = "<|im_end|>"


class TemplateMismatchError(ValueError):
    """The chat template's rendering of a prefix is not a token prefix of the whole chat."""


def end_of_turn_id(tokenizer) -> int:
    """Id of the token that closes a turn: ``<|im_end|>`` for ChatML, else the tokenizer's EOS.

    Raises:
        ValueError: neither exists.
    """
    vocab = tokenizer.get_vocab()
    if END_OF_TURN_TOKEN in vocab:
        return vocab[END_OF_TURN_TOKEN]
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither <|im_end|> nor an eos_token; set one so turns can end")
    return tokenizer.eos_token_id


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_chat(messages: Sequence[dict], tokenizer, eot_id: int, example: str = "example") -> Segment:
    """Render and tokenise one chat; label only assistant replies and their end-of-turn token.

    Args:
        messages: ``[{"role", "content"}, ...]`` (already validated, see ``records.py``).
        tokenizer: a Hugging Face tokenizer with a chat template.
        eot_id: the end-of-turn id (``end_of_turn_id(tokenizer)``).
        example: a name for error messages, e.g. ``"data.jsonl:12"``.

    Returns:
        ``Segment`` whose ``labels[t] == input_ids[t]`` on trained tokens, ``IGNORE_INDEX`` elsewhere.
        It may have zero trained tokens; the caller counts and drops those.

    Raises:
        TemplateMismatchError: a rendered prefix is not a token prefix of the full chat, or an
            assistant turn has no end-of-turn token.
    """
    messages = list(messages)
    full_ids = _ids(tokenizer, _render(tokenizer, messages, False))
    labels = [IGNORE_INDEX] * len(full_ids)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = _prefix_len(tokenizer, messages[:i], True, full_ids, example, i)
        end = _prefix_len(tokenizer, messages[: i + 1], False, full_ids, example, i)
        span = full_ids[start:end]
        if eot_id not in span:
            raise TemplateMismatchError(
                f"{example}: assistant turn messages[{i}] is not closed by end-of-turn id {eot_id} "
                "in the chat template's rendering; packlora needs it to teach the model to stop"
            )
        last = start + len(span) - 1 - span[::-1].index(eot_id)
        labels[start : last + 1] = full_ids[start : last + 1]
    return Segment(tuple(full_ids), tuple(labels))


def _prefix_len(tokenizer, prefix, add_generation_prompt, full_ids, example, i) -> int:
    ids = _ids(tokenizer, _render(tokenizer, prefix, add_generation_prompt))
    if full_ids[: len(ids)] != ids:
        what = "messages[:%d] + generation prompt" % i if add_generation_prompt else "messages[:%d]" % (i + 1)
        raise TemplateMismatchError(
            f"{example}: the chat template's rendering of {what} is not a token prefix of the whole chat, "
            "so assistant labels cannot be placed exactly. Use a template that renders earlier turns "
            "identically (ChatML does), or check for content that merges across the turn boundary "
            "(e.g. a reply starting with newlines)"
        )
    return len(ids)


def tokenize_chat_full_sequence(messages: Sequence[dict], tokenizer) -> Segment:
    """Bug reproduction only (``data.labels: legacy_full_sequence``): label the WHOLE rendered chat.

    System and user text and every ``<|im_start|>role\\n`` header are trained, so the model learns
    to write the next turn itself. Never use this for a real model; it exists so that
    ``scripts/behaviour_boundary.py`` can measure the runaway it causes.

    Returns:
        ``Segment`` with ``labels == input_ids`` (every token trained).
    """
    ids = tuple(_ids(tokenizer, _render(tokenizer, list(messages), False)))
    return Segment(ids, ids)
