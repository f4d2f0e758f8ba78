"""Decode a file of prompts with a checkpoint: the library behind ``packlora decode``.

Input lines are anything ``data_utils.records`` accepts for chats (``messages``,
``conversations``, ``instruction``); a chat with no assistant turn is a bare prompt. When a chat
ends with an assistant turn, that turn is the ``reference`` and the prompt is everything before it
(``ChatFormat.split_reference``). Each output line is::

    {"source": "prompts.jsonl:3", "messages": [...prompt...], "reference": "..." | null,
     "reply": "...", "stop_reason": "stop_id" | "stop_string" | "max_new_tokens", "num_new_tokens": 17}

Training decodes its held-out prompts after the last step with ``decode_file`` too.
"""
from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from packlora.core.errors import InputError
from packlora.data_utils.chat_format import ChatFormat
from packlora.data_utils.records import RecordError, iter_lines, parse_line
from packlora.data_utils.types import Source, TextRecord

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Prompt:
    """One input line, split for decoding.

    Attributes:
        messages: the conversation to reply to (``{"role", "content"}`` dicts); never ends with
            an assistant turn.
        reference: the content of the line's final assistant turn, or None if it had none.
        source: file and 1-based line.
    """

    messages: tuple[dict[str, str], ...]
    reference: str | None
    source: Source


def read_prompts(path: str | Path, limit: int | None = None) -> list[Prompt]:
    """Read the first ``limit`` (default: all) prompts of a JSONL file.

    Lines are read as ``data_utils.records`` reads training data (a blank line is an error here too).

    Raises:
        DataFileError: the file cannot be read (``records.data_file_error``: missing, a directory, a
            FIFO or device, unreadable, compressed), or changed while it was read.
        RecordError: a line is not a valid chat (``path:line:`` first, ``reason`` one of
            ``records.REASONS`` or ``records.PROMPT_REASONS``), e.g. a ``{"text"}`` line or a chat
            whose only message is the assistant's.
    """
    prompts: list[Prompt] = []
    if limit is not None and limit < 1:
        return prompts
    for prompt in _iter_prompts(Path(path)):
        prompts.append(prompt)
        if limit is not None and len(prompts) >= limit:
            break  # the lines after the limit are not read (a bad one there is no error)
    return prompts


def decode_file(
    checkpoint,
    input_path: str | Path,
    output_path: str | Path,
    limit: int | None = None,
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    sampling=None,
    dtype=None,
    device=None,
    preset: str | None = None,
    stop_strings: tuple[str, ...] | list[str] = (),
    no_stop_ids: bool = False,
    stream: bool = False,
) -> list[dict]:
    """Decode the prompts of ``input_path`` and write one JSON line per prompt to ``output_path``.

    Args:
        checkpoint: a checkpoint directory, or a ``LoadedCheckpoint`` already in memory (the
            training job passes its own to avoid a reload).
        input_path, output_path: JSONL files (see the module docstring); the output's parent
            directory is created, the file overwritten, and each batch flushed as it is done.
        limit: decode only the first ``limit`` prompts.
        max_new_tokens: default: the checkpoint's (``LoadedCheckpoint.max_new_tokens``).
        batch_size: as in ``generate_replies``.
        sampling: a ``decoding.generate.Sampling`` (default: greedy). Batch k is decoded with its seed
            moved by the index of its first prompt (``Sampling.for_offset``).
        dtype, device: as in ``load_checkpoint`` (ignored for a ``LoadedCheckpoint``).
        preset: a style preset name or YAML path (``presets/``): applied to every prompt as in
            training (``presets.apply_preset``), and its stop tokens join the stop ids.
        stop_strings: multi-token stop strings (e.g. ``"\\nuser\\n"``); each reply is cut before
            the first one (``decoding.stop_strings``). Those of the model's generation config
            (``generate.model_stop_strings``) are honoured as well.
        no_stop_ids: EXPERIMENTS ONLY: stop at the tokenizer's eos token alone, ignoring the
            checkpoint's stop ids (``decoding.runaway.naive_stop_ids``); replies run on.
        stream: write each reply to stdout as it is generated (needs ``batch_size`` 1), never
            showing a stop or the characters that may still become a stop string.

    Returns:
        The output rows, as written.

    Raises:
        FileNotFoundError, RecordError, ValueError: see ``load_checkpoint``, ``read_prompts``
        and ``generate_replies``; also an input file with no prompt.
    """
    from packlora.decoding.generate import (
        GREEDY,
        LoadedCheckpoint,
        check_decoding_settings,
        generate_replies,
        load_checkpoint,
        model_stop_strings,
    )
    from packlora.decoding.stop_strings import StopStringMatcher

    sampling = GREEDY if sampling is None else sampling
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InputError(f"limit must be a positive int, got {limit!r}")
    check_decoding_settings(max_new_tokens, batch_size, sampling)
    prompts = read_prompts(input_path, limit)
    if not prompts:
        raise InputError(f"{input_path} holds no prompts; give a JSONL file with at least one chat to reply to")
    ckpt = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint, dtype, device)
    if preset is not None:
        prompts, ckpt = _apply_preset(prompts, ckpt, preset)
    if no_stop_ids:
        ckpt = _without_stop_ids(ckpt)
    if stream and batch_size != 1:
        raise InputError(f"streaming decodes one prompt at a time; use batch_size 1 (got {batch_size})")
    max_new_tokens = ckpt.max_new_tokens if max_new_tokens is None else max_new_tokens
    # every stop string generation honours, the model's own included: what the streamer must hold back
    active_strings = [*StopStringMatcher(stop_strings).stop_strings, *model_stop_strings(ckpt.model)]
    logger.info(
        "decoding %d prompts from %s: %s, max_new_tokens %s, batch_size %s, stop ids %s",
        len(prompts), input_path, sampling.describe(), max_new_tokens, batch_size,
        ckpt.fmt.format_ids(ckpt.stop_ids),
    )

    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    # One generate_replies call per batch, so progress is on disk as it is made. Batch k is
    # seeded with seed + k * batch_size (its first prompt's index).
    with open(output_path, "w", encoding="utf-8") as out:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            streamer = _streamer(ckpt, active_strings, chunk[0]) if stream else None
            replies = generate_replies(
                ckpt.model, ckpt.fmt, [list(p.messages) for p in chunk], ckpt.stop_ids,
                max_new_tokens=max_new_tokens, batch_size=batch_size, sampling=sampling.for_offset(start),
                stop_strings=stop_strings, streamer=streamer,
            )
            for prompt, reply in zip(chunk, replies, strict=True):
                row = {
                    "source": str(prompt.source),
                    "messages": list(prompt.messages),
                    "reference": prompt.reference,
                    "reply": reply.text,
                    "stop_reason": reply.stop_reason,
                    "num_new_tokens": reply.num_new_tokens,
                }
                if active_strings:
                    row["stop_string"] = reply.stop_string
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                rows.append(row)
            out.flush()
            logger.info("%d/%d prompts decoded", len(rows), len(prompts))
    return rows


def _iter_prompts(path: Path) -> Iterator[Prompt]:
    lines = iter_lines(path, "prompt file (--input)")
    for _, raw, src in lines:
        box = [raw]
        del raw
        try:
            record = parse_line(box, src, prompt=True)
            if isinstance(record, TextRecord):
                raise RecordError(
                    src, "a {'text'} line has no chat to reply to; --input needs 'messages', 'conversations' or "
                    "'instruction' lines", "text_record"
                )
            messages, reference = ChatFormat.split_reference(record.as_dicts())
            if not messages:
                raise RecordError(src, "the chat is a lone assistant turn; add the user message it answers",
                                  "lone_assistant_turn")
        except RecordError as err:
            lines.throw(err)  # raises err, or a DataFileError when the file was cut while being read
        yield Prompt(tuple(messages), reference, src)


def _without_stop_ids(ckpt):
    """``ckpt`` decoding like a chat-unaware decoder (``--no-stop-ids``), with a loud warning."""
    import dataclasses

    from packlora.decoding.runaway import naive_stop_ids

    naive = tuple(naive_stop_ids(ckpt.fmt))
    logger.warning(
        "--no-stop-ids: EXPERIMENT ONLY. Ignoring the checkpoint's stop ids %s; stopping at %s alone, as a "
        "chat-unaware decoder would. Replies are expected to run on into invented turns.",
        ckpt.fmt.format_ids(ckpt.stop_ids), ckpt.fmt.format_ids(naive),
    )
    return dataclasses.replace(ckpt, stop_ids=naive)


def _streamer(ckpt, stop_strings, prompt: Prompt):
    from packlora.decoding.stop_strings import StopAwareStreamer, StopStringMatcher

    sys.stdout.write(f"--- {prompt.source}\n")
    return StopAwareStreamer(ckpt.tokenizer, ckpt.stop_ids, StopStringMatcher(stop_strings))


def _apply_preset(prompts: list[Prompt], ckpt, preset: str):
    """Prompts with the preset's system message and guard (``presets.apply_preset``) and ``ckpt``
    with its stop ids added.

    Raises:
        ValueError: unknown preset (``presets.PresetError``), or a stop token that is not one token.
    """
    import dataclasses
    from collections import Counter

    from packlora.presets import GUARDED_ACTIONS, apply_preset, load_preset

    p = load_preset(preset)
    try:
        stop_ids = tuple(dict.fromkeys([*ckpt.stop_ids, *ckpt.fmt.stop_ids(p.stop_tokens)]))
    except ValueError as e:
        raise InputError(f"--preset {p.name}: {e}") from None
    actions: Counter = Counter()
    out = []
    for q in prompts:
        messages, action = apply_preset(q.messages, p)
        actions[action] += 1
        out.append(dataclasses.replace(q, messages=tuple(messages)))
    logger.info("--preset %s: %d of %d prompts carry its guard (%s)", p.name,
                sum(n for a, n in actions.items() if a in GUARDED_ACTIONS), len(prompts),
                ", ".join(f"{a}: {n}" for a, n in sorted(actions.items())))
    return out, dataclasses.replace(ckpt, stop_ids=stop_ids)
