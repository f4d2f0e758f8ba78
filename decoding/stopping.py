"""Cutting a generated row at its first stop id.

Which ids stop a reply is the chat format's business (``data_utils.chat_format.ChatFormat.stop_ids``:
the checkpoint's ``generation_config.eos_token_id``, the end of turn, the tokenizer's eos and the
run's ``decoding.stop_tokens``), so a decoder that stops only at ``tokenizer.eos_token_id`` (for
Qwen2 base tokenizers: end of text, not end of turn) never runs on into a made-up next turn.
"""
from __future__ import annotations

from collections.abc import Iterable


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
