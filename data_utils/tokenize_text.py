"""Raw text (stage 1) -> ``Segment``: every token trained, EOS appended.

Stage 1 (``data.stage: pretrain``) trains on ``{"text"}`` records only.

A document longer than ``max_seq_length`` is either split into consecutive chunks of at most
``max_seq_length`` tokens (``overflow="split"``, the default for text) or dropped/refused like an
over-long chat. Each chunk becomes its own packed segment, so the collator masks its first label
and resets its positions: no chunk is trained from the end of the previous one.
"""
from __future__ import annotations

from packlora.data_utils.types import Segment


def tokenize_text(text: str, tokenizer, eos_id: int) -> Segment:
    """Tokenise a document and append ``eos_id``; ``labels == input_ids`` (all trained).

    >>> class Chars:  # a stand-in tokenizer: one id per character
    ...     def __call__(self, s, add_special_tokens=False): return {"input_ids": [ord(c) for c in s]}
    >>> tokenize_text("ab", Chars(), eos_id=0)
    Segment(input_ids=(97, 98, 0), labels=(97, 98, 0))
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [eos_id]
    return Segment(tuple(ids), tuple(ids))


def split_segment(seg: Segment, max_seq_length: int, eos_id: int | None = None) -> list[Segment]:
    """Cut a segment into consecutive chunks of at most ``max_seq_length`` tokens.

    With ``eos_id=None`` (``data.text_eos: document``) the cut is plain, so only the last chunk
    ends with the document's EOS. With ``eos_id`` (``data.text_eos: chunk``) the segment must end
    with ``eos_id``; its body is cut into chunks of ``max_seq_length - 1`` and each gets an EOS.

    >>> doc = Segment((5, 6, 7, 8, 9, 10, 0), (5, 6, 7, 8, 9, 10, 0))   # 0 = EOS
    >>> [s.input_ids for s in split_segment(doc, 3)]
    [(5, 6, 7), (8, 9, 10), (0,)]
    >>> [s.input_ids for s in split_segment(doc, 3, eos_id=0)]
    [(5, 6, 0), (7, 8, 0), (9, 10, 0)]

    Raises:
        ValueError: ``eos_id`` is given but the segment does not end with it, or ``max_seq_length < 2``.
    """
    if eos_id is None:
        return [
            Segment(seg.input_ids[i : i + max_seq_length], seg.labels[i : i + max_seq_length])
            for i in range(0, len(seg), max_seq_length)
        ]
    if not seg.input_ids or seg.input_ids[-1] != eos_id:
        raise ValueError(f"split_segment(eos_id={eos_id}): the segment does not end with it; tokenise with tokenize_text")
    if max_seq_length < 2:
        raise ValueError(f"max_seq_length={max_seq_length}: a chunk needs room for a token and its EOS")
    body, labels, step = seg.input_ids[:-1], seg.labels[:-1], max_seq_length - 1
    return [
        Segment(body[i : i + step] + (eos_id,), labels[i : i + step] + (seg.labels[-1],))
        for i in range(0, len(body), step)
    ]
