"""The batch functions ``datasets.map`` runs over Arrow, in the worker processes too: labelling a batch
of records (``tokenize_batch``) and gathering a batch of bins into rows (``pack_batch``).

The records come in as Arrow columns (``record_schema``): a chat's messages as a list of
``{role, content, reasoning_content}`` structs, a document's text as a string, each record's
``file:line``; no JSON in between. The chat format comes in as an argument: the ``ChatFormat``
itself, or a ``FormatRef`` that a worker loads once (a few hundred bytes to send instead of a
~10 MB tokenizer).
"""
from __future__ import annotations

from packlora.core.errors import InputError
from packlora.data_utils.chat_format import ChatFormat, EncodedChat, FormatRef, LabelError
from packlora.data_utils.config import DataConfig
from packlora.data_utils.tokenize_text import split_segment
from packlora.data_utils.types import ChatRecord, Segment

COLUMNS = ("input_ids", "labels", "length", "source", "drop_reason", "assistant_turns", "chunks", "per_turn",
           "render_mismatch", "control_text")
"""The tokenised dataset's columns: one row per example, or per drop (``drop_reason`` set)."""
COUNT_COLUMNS = ("assistant_turns", "chunks", "per_turn", "render_mismatch", "control_text")
"""The columns summed into the data report."""
CHATS_PER_CALL = 64  # chats labelled per tokenizer call: the per-call cost amortised, a call's buffers small
CHECK_CHARS = 1_000_000  # a record with more characters is checked for length before it is tokenised


class OverflowError_(InputError):
    """An example is longer than ``max_seq_length`` under ``overflow: error``."""


def tokenized_schema():
    """The tokenised dataset's columns (what ``datasets`` inferred when the batches were Python lists)."""
    import pyarrow as pa

    return pa.schema([("source", pa.string()), ("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int64())),
                      ("length", pa.int64()), ("drop_reason", pa.string()), *((c, pa.int64()) for c in COUNT_COLUMNS)])


def record_schema():
    """The records' Arrow columns (``read_stage`` writes them, ``tokenize_batch`` reads them):
    ``messages`` (a list of ``{role, content, reasoning_content}`` structs, null for a text record),
    ``text`` (null for a chat), ``source`` (``file:line``), ``source_index`` (the record's source in
    ``data.train`` / ``data.eval``, int32) and ``too_long`` (-1, or for a record found certainly too
    long while it was read, ``record_too_long``'s count: its text is then left out, ``messages`` an
    empty list or ``text`` empty)."""
    import pyarrow as pa

    message = pa.struct([("role", pa.string()), ("content", pa.string()), ("reasoning_content", pa.string())])
    return pa.schema([("messages", pa.list_(message)), ("text", pa.string()), ("source", pa.string()),
                      ("source_index", pa.int32()), ("too_long", pa.int64())])


def record_columns(record, too_long: int | None = None) -> tuple:
    """One record's ``messages``, ``text`` and ``source`` in ``record_schema`` order; its text left out
    when ``too_long`` is not None.

    >>> from packlora.data_utils.types import Message, Source
    >>> record_columns(ChatRecord((Message("user", "Hi"), Message("assistant", "Yes.")), Source("a.jsonl", 3)))
    ([('user', 'Hi', None), ('assistant', 'Yes.', None)], None, 'a.jsonl:3')
    """
    if isinstance(record, ChatRecord):
        return ([(m.role, m.content, m.reasoning) for m in record.messages] if too_long is None else [], None,
                str(record.source))
    return None, record.text if too_long is None else "", str(record.source)


def record_too_long(record, fmt: ChatFormat, cfg: DataConfig) -> int | None:
    """``certainly_too_long`` of a ``ChatRecord`` / ``TextRecord`` of more than ``CHECK_CHARS``
    characters, else None (cheap: a sum of lengths). ``read_stage`` calls it on each record as it is
    read, so a huge record's text never reaches the Arrow file or a tokenising worker."""
    if isinstance(record, ChatRecord):
        if sum(len(m.content) + len(m.reasoning or "") for m in record.messages) <= CHECK_CHARS:
            return None
        return certainly_too_long(record.as_dicts(), None, fmt, cfg)
    return certainly_too_long(None, record.text, fmt, cfg) if len(record.text) > CHECK_CHARS else None


def _as_dicts(messages) -> list[dict]:
    """Arrow's message structs as ``ChatRecord.as_dicts`` gives them: no ``reasoning_content`` key
    when a message has none (a template may test whether the key is defined)."""
    return [{"role": m["role"], "content": m["content"]} if m["reasoning_content"] is None else m for m in messages]


def tokenize_batch(batch, fmt: ChatFormat | FormatRef, cfg: DataConfig):
    """Label a batch of ``record_schema`` rows: one output row per example (a chat split per turn, a
    text split into chunks, give several), or one per dropped record with its ``drop_reason``;
    columns ``COLUMNS`` (``tokenized_schema``).

    Raises:
        LabelError: a chat that cannot be labelled, under ``on_error: error``.
        OverflowError_: an over-long example under ``overflow: error``.
        InputError: ``overflow: split`` with a chat.
    """
    import pyarrow as pa

    if isinstance(fmt, FormatRef):
        fmt = fmt.build()
    out: dict[str, list] = {k: [] for k in COLUMNS}

    def emit(seg: Segment | None, source: str, reason: str = "", **counts):
        for k, v in (("input_ids", seg.input_ids if seg else ()), ("labels", seg.labels if seg else ()),
                     ("length", len(seg) if seg else 0), ("source", source), ("drop_reason", reason)):
            out[k].append(v)
        for k in COUNT_COLUMNS:
            out[k].append(counts.get(k, 0))

    policy = "drop" if cfg.overflow == "auto" else cfg.overflow
    # every chat of the batch labelled at once (one tokenizer call); errors kept for their turn below
    batched = cfg.labels != "legacy_full_sequence" and policy != "split"
    chats = [(i, _as_dicts(m)) for i, (m, t) in enumerate(zip(batch["messages"], batch["too_long"]))
             if batched and m is not None and t < 0]
    labelled = {}
    for k in range(0, len(chats), CHATS_PER_CALL):
        part = chats[k: k + CHATS_PER_CALL]
        labelled.update(zip((i for i, _ in part), fmt.encode_chats(
            [m for _, m in part], [batch["source"][i] for i, _ in part], max_length=cfg.max_seq_length)))
    for row, (messages, text, source, too_long) in enumerate(
            zip(batch["messages"], batch["text"], batch["source"], batch["too_long"])):
        if too_long >= 0:  # found certainly too long as it was read (``record_too_long``, overflow: drop)
            emit(None, source, "too_long", control_text=too_long)
            continue
        if messages is None:
            _emit_text(emit, text, source, fmt, cfg)
            continue
        if policy == "split":
            raise InputError(f"{source}: data.overflow=split would cut a chat mid-answer; use drop or error for chats")
        try:
            if cfg.labels == "legacy_full_sequence":
                msgs = _as_dicts(messages)  # the batched path converted its chats above
                ids = tuple(fmt.encode_full(msgs))
                chat = EncodedChat((Segment(ids, ids),), turns_per_example=(_turns(msgs),))
            else:
                chat = labelled[row]
                if isinstance(chat, LabelError):
                    raise chat
        except LabelError as e:
            if cfg.on_error == "error":
                raise
            emit(None, source, e.reason)
            continue
        first = True
        for seg, turns in zip(chat.examples, chat.turns_per_example):
            head = dict(per_turn=int(chat.per_turn), render_mismatch=chat.render_mismatch,
                        control_text=chat.control_text_messages) if first else {}
            first = False
            if seg is None or len(seg) > cfg.max_seq_length:  # None: certainly too long, so never tokenised
                if policy == "error":
                    raise OverflowError_(f"{source}: example has {'more than' if seg is None else len(seg)} tokens > "
                                         f"data.max_seq_length={cfg.max_seq_length}; raise max_seq_length, or set "
                                         "data.overflow=drop (counted)")
                emit(None, source, "too_long", **head)
            elif seg.num_trained == 0:
                emit(None, source, "no_trained_tokens", **head)
            else:
                emit(seg, source, assistant_turns=turns, **head)
    # an Arrow table (pyarrow converts the id tuples in C), not lists that datasets would scan and convert
    return pa.Table.from_pydict(out, schema=tokenized_schema())


def _emit_text(emit, text: str, source: str, fmt: ChatFormat, cfg: DataConfig) -> None:
    """A ``{"text"}`` record: every token trained, EOS at the end (``fmt.encode_text``: control-token
    strings in the text stay text), under the overflow policy; a document certainly over
    ``max_seq_length`` (``fmt.min_tokens``) is dropped or refused without being tokenised."""
    eos = fmt.tokenizer.eos_token_id
    policy = "split" if cfg.overflow == "auto" else cfg.overflow
    if policy != "split" and fmt.min_tokens(text) + 1 > cfg.max_seq_length:
        seg = None
    else:
        ids = (*fmt.encode_text(text), eos)
        seg = Segment(ids, ids)
    if seg is not None and len(seg) <= cfg.max_seq_length:
        emit(seg, source)
    elif policy == "error":
        raise OverflowError_(f"{source}: example has {'more than' if seg is None else len(seg)} tokens > "
                             f"data.max_seq_length={cfg.max_seq_length}; raise max_seq_length, or set "
                             "data.overflow=drop (counted) or split (text only)")
    elif policy == "drop":
        emit(None, source, "too_long")
    else:
        for k, piece in enumerate(split_segment(seg, cfg.max_seq_length, eos if cfg.text_eos == "chunk" else None)):
            emit(piece, source, chunks=1 if k else 0)


def certainly_too_long(messages: list[dict] | None, text: str | None, fmt: ChatFormat, cfg: DataConfig) -> int | None:
    """For a record (its ``messages`` as dicts, or a document's ``text``) of more than
    ``CHECK_CHARS`` characters under ``overflow: drop`` (or ``auto`` for chats), the number of its
    messages that spell control tokens when it is certainly over ``max_seq_length``
    (``ChatFormat.certainly_longer`` / ``min_tokens``, no tokenising), else None. Such a record is
    counted as ``too_long`` without being tokenised: a 50 MB line costs one rendering of memory."""
    if cfg.labels != "assistant_only" or cfg.overflow not in ("auto", "drop"):
        return None
    if messages is None:
        if cfg.overflow == "auto" or len(text) <= CHECK_CHARS:
            return None
        return 0 if fmt.min_tokens(text) + 1 > cfg.max_seq_length else None
    if sum(len(m["content"]) + len(m.get("reasoning_content") or "") for m in messages) <= CHECK_CHARS:
        return None
    if not fmt.certainly_longer(messages, cfg.max_seq_length):
        return None
    return sum(fmt.spells_control_token(m["content"]) or fmt.spells_control_token(m.get("reasoning_content") or "")
               for m in messages)


def _turns(msgs) -> int:
    return sum(m["role"] == "assistant" for m in msgs)


def pack_batch(batch, kept):
    """The rows of a batch of bins: each row the concatenation of its members' ids and labels,
    gathered as Arrow arrays (no Python loop over tokens)."""
    import numpy as np
    import pyarrow as pa

    members = batch["members"]
    sub = kept.with_format("arrow")[[i for m in members for i in m]]  # the members, in row order
    per_row = np.fromiter((len(m) for m in members), dtype=np.int64, count=len(members))
    item_offsets = np.zeros(len(members) + 1, dtype=np.int64)
    np.cumsum(per_row, out=item_offsets[1:])
    lengths = sub.column("length").to_numpy()
    token_offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=token_offsets[1:])
    row_offsets = pa.array(token_offsets[item_offsets], type=pa.int32())
    return pa.table({
        "input_ids": pa.ListArray.from_arrays(row_offsets, sub.column("input_ids").combine_chunks().flatten()),
        "labels": pa.ListArray.from_arrays(row_offsets, sub.column("labels").combine_chunks().flatten()),
        "seq_lens": pa.ListArray.from_arrays(pa.array(item_offsets, type=pa.int32()), pa.array(lengths, type=pa.int64())),
    })
