"""Which token ids end a reply.

A ChatML model ends its turn with ``<|im_end|>``. Qwen2 *base* tokenizers set ``eos_token`` to
``<|endoftext|>``, so a decoder that stops only at ``tokenizer.eos_token_id`` runs on into a
made-up next turn (``<|im_end|>\\n<|im_start|>user\\n...``). ``resolve_stop_ids`` therefore takes
the union of every source of stop ids, with the checkpoint's own ``generation_config`` first.

Only single-token stops are supported: a stop string must be exactly one token of the vocabulary.

Example (the real Qwen2 tokenizer; ``eos_token`` is ``<|endoftext|>`` = 151643)::

    >>> from transformers import AutoTokenizer
    >>> tok = AutoTokenizer.from_pretrained("../shared/assets/qwen2-tokenizer")
    >>> resolve_stop_ids(tok, {"eos_token_id": 151643})   # <|im_end|> is added anyway
    [151643, 151645]
    >>> resolve_stop_ids(tok, {"eos_token_id": [151645, 151643]}, stop_tokens=["\\n\\n"])
    [151645, 151643, 271]
    >>> format_stop_ids(tok, [151645, 271])
    "151645 '<|im_end|>', 271 '\\\\n\\\\n'"
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

END_OF_TURN = "<|im_end|>"
"""The ChatML end-of-turn token; always a stop when the tokenizer has it."""


def resolve_stop_ids(tokenizer: Any, generation_config: Any = None, stop_tokens: Iterable[str] = ()) -> list[int]:
    """The ordered, duplicate-free union of all stop ids for a checkpoint.

    Order: ``generation_config.eos_token_id`` (an int or a list), then ``<|im_end|>`` if it is
    in the tokenizer's vocabulary, then ``tokenizer.eos_token_id``, then each of ``stop_tokens``.

    Args:
        tokenizer: a Hugging Face tokenizer.
        generation_config: a ``transformers.GenerationConfig``, the dict read from
            ``generation_config.json``, or None.
        stop_tokens: extra stop strings (e.g. ``decoding.stop_tokens`` of the training config);
            each must encode to exactly one token.

    Returns:
        The stop ids (token ids, ints), at least one.

    Raises:
        ValueError: a stop string is not exactly one token, an eos id is not an int, or no stop
            id was found at all.
    """
    if isinstance(stop_tokens, str):
        raise ValueError(
            f"stop_tokens must be a list of strings, got the string {stop_tokens!r}; write [{stop_tokens!r}]"
        )
    ids: list[int] = []

    def add(token_id: Any, where: str) -> None:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise ValueError(f"{where} must be a non-negative int token id, got {token_id!r}; fix {where}")
        if token_id not in ids:
            ids.append(token_id)

    if generation_config is not None:
        if isinstance(generation_config, Mapping):
            eos = generation_config.get("eos_token_id")
        else:
            eos = getattr(generation_config, "eos_token_id", None)
        for token_id in [eos] if isinstance(eos, int) else (eos or []):
            add(token_id, "generation_config.eos_token_id")

    end_of_turn = tokenizer.get_vocab().get(END_OF_TURN)
    if end_of_turn is not None:
        add(end_of_turn, f"the tokenizer's {END_OF_TURN} id")
    if tokenizer.eos_token_id is not None:
        add(tokenizer.eos_token_id, "tokenizer.eos_token_id")

    for text in stop_tokens:
        encoded = tokenizer.encode(text, add_special_tokens=False) if isinstance(text, str) else None
        if encoded is None or len(encoded) != 1:
            got = "not a string" if encoded is None else f"{len(encoded)} tokens {encoded}"
            raise ValueError(
                f"stop token {text!r} is {got} with this tokenizer; each stop token must be exactly one "
                f"token. Use a single vocabulary token such as {END_OF_TURN!r}, or add {text!r} to the "
                "tokenizer as a special token before training (decoding.stop_tokens)"
            )
        add(encoded[0], f"stop token {text!r}")

    if not ids:
        raise ValueError(
            "no stop ids: generation_config has no eos_token_id, the tokenizer has neither "
            f"{END_OF_TURN} nor an eos_token, and no stop_tokens were given; set decoding.stop_tokens "
            f"(e.g. [{END_OF_TURN!r}]) or eos_token_id in generation_config.json"
        )
    return ids


def format_stop_ids(tokenizer: Any, stop_ids: Iterable[int]) -> str:
    """``"id 'text', ..."`` for logs, each id decoded with special tokens kept."""
    return ", ".join(f"{i} {tokenizer.decode([i], skip_special_tokens=False)!r}" for i in stop_ids)


def cut_at_first_stop(token_ids: Iterable[int], stop_ids: Iterable[int]) -> tuple[tuple[int, ...], int | None]:
    """Split generated ids at the first stop id.

    Returns ``(kept, stop_id)``: the ids before the first stop (the stop itself and everything
    after it, e.g. the pad ids ``generate`` writes once a row is done, are dropped), and the stop
    id that was hit, or None if there was none (then ``kept`` is every id).

    >>> cut_at_first_stop([5, 6, 2, 0, 0], stop_ids=[2, 0])
    ((5, 6), 2)
    >>> cut_at_first_stop([5, 6, 7], stop_ids=[2, 0])
    ((5, 6, 7), None)
    """
    stops = set(stop_ids)
    kept: list[int] = []
    for token_id in token_ids:
        if token_id in stops:
            return tuple(kept), token_id
        kept.append(token_id)
    return tuple(kept), None
