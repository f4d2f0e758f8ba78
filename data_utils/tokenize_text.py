"""Raw text (stage 1) -> ``Segment``: every token trained, EOS appended.

A document longer than ``max_seq_length`` is either split into consecutive chunks of at most
``max_seq_length`` tokens (``overflow="split"``, the default for text) or dropped/refused like an
over-long chat. Each chunk becomes its own packed segment, so the collator masks its first label
and resets its positions: no chunk is trained from the end of the previous one.
"""
from __future__ import annotations

from data_utils.types import Segment


def tokenize_text(text: str, tokenizer, eos_id: int) -> Segment:
    """Tokenise a document and append ``eos_id``; ``labels == input_ids`` (all trained).

    >>> class Chars:  # a stand-in tokenizer: one id per character
    ...     def __call__(self, s, add_special_tokens=False): return {"input_ids": [ord(c) for c in s]}
    >>> tokenize_text("ab", Chars(), eos_id=0)
    Segment(input_ids=(97, 98, 0), labels=(97, 98, 0))
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos_id]
    return Segment(tuple(ids), tuple(ids))


def split_segment(seg: Segment, max_seq_length: int) -> list[Segment]:
    """Cut a segment into consecutive chunks of at most ``max_seq_length`` tokens.

    >>> [len(s) for s in split_segment(Segment(tuple(range(7)), tuple(range(7))), 3)]
    [3, 3, 1]
    """
    return [
        Segment(seg.input_ids[i : i + max_seq_length], seg.labels[i : i + max_seq_length])
        for i in range(0, len(seg), max_seq_length)
    ]
