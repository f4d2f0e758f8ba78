"""``packlora decode``: generate a reply for every prompt of a JSONL file.

    packlora decode runs/exp1/checkpoint-final --input prompts.jsonl --output replies.jsonl
    packlora decode CKPT --input held_out.jsonl --output out.jsonl --do-sample --temperature 0.7 --seed 0

Input lines are anything ``data_utils.records.read_records`` accepts for chats (``messages``,
``conversations``, ``instruction``/``output``); a chat with no assistant turn is a bare prompt.
When a chat ends with an assistant turn, that turn is the ``reference`` and the prompt is
everything before it. Each output line is::

    {"source": "prompts.jsonl:3", "messages": [...prompt...], "reference": "..." | null,
     "reply": "...", "stop_reason": "stop_id" | "max_new_tokens", "num_new_tokens": 17}
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_utils.records import RecordError, parse_record
from data_utils.types import Source, TextRecord

logger = logging.getLogger(__name__)

_PLACEHOLDER = "(no reference)"


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

    Raises:
        FileNotFoundError: no such file.
        RecordError: a line is not a valid chat (``path:line:`` first), e.g. a ``{"text"}`` line
            or a chat whose only message is the assistant's.
    """
    prompts = []
    for prompt in _iter_prompts(Path(path)):
        if limit is not None and len(prompts) >= limit:
            break
        prompts.append(prompt)
    return prompts


def decode_file(
    checkpoint,
    input_path: str | Path,
    output_path: str | Path,
    limit: int | None = None,
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
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
        batch_size, do_sample, temperature, top_p, seed: as in ``generate_replies``.
        dtype, device: as in ``load_checkpoint`` (ignored for a ``LoadedCheckpoint``).
        preset: a style preset name or YAML path (``presets/``): prompts without a system message
            get its system prompt + guard sentence, and its stop tokens join the stop ids.
        stop_strings: multi-token stop strings (e.g. ``"\\nuser\\n"``); each reply is cut before
            the first one (``decoding.stop_strings``).
        no_stop_ids: EXPERIMENTS ONLY: stop at the tokenizer's eos token alone, ignoring the
            checkpoint's stop ids (``decoding.runaway.naive_stop_ids``); replies run on.
        stream: write each reply to stdout as it is generated (needs ``batch_size`` 1), never
            showing a stop or the characters that may still become a stop string.

    Returns:
        The output rows, as written.

    Raises:
        FileNotFoundError, RecordError, ValueError: see ``load_checkpoint``, ``read_prompts``
        and ``generate_replies``.
    """
    from decoding.generate import LoadedCheckpoint, check_decoding_settings, generate_replies, load_checkpoint
    from decoding.stopping import format_stop_ids

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int, got {limit!r}")
    check_decoding_settings(max_new_tokens, batch_size, do_sample, temperature, top_p, seed)
    prompts = read_prompts(input_path, limit)
    ckpt = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint, dtype, device)
    if preset is not None:
        prompts, ckpt = _apply_preset(prompts, ckpt, preset)
    if no_stop_ids:
        ckpt = _without_stop_ids(ckpt)
    if stream and batch_size != 1:
        raise ValueError(f"streaming decodes one prompt at a time; use batch_size 1 (got {batch_size})")
    max_new_tokens = ckpt.max_new_tokens if max_new_tokens is None else max_new_tokens
    mode = f"sampling (temperature {temperature}, top_p {top_p}, seed {seed})" if do_sample else "greedy"
    logger.info(
        "decoding %d prompts from %s: %s, max_new_tokens %s, batch_size %s, stop ids %s",
        len(prompts), input_path, mode, max_new_tokens, batch_size,
        format_stop_ids(ckpt.tokenizer, ckpt.stop_ids),
    )

    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    # One generate_replies call per batch, so progress is on disk as it is made. Batch k is
    # seeded with seed + k * batch_size (its first prompt's index).
    with open(output_path, "w", encoding="utf-8") as out:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            streamer = _streamer(ckpt, stop_strings, chunk[0]) if stream else None
            replies = generate_replies(
                ckpt.model, ckpt.tokenizer, [list(p.messages) for p in chunk], ckpt.stop_ids,
                max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=do_sample,
                temperature=temperature, top_p=top_p, seed=None if seed is None else seed + start,
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
                if stop_strings:
                    row["stop_string"] = reply.stop_string
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
                rows.append(row)
            out.flush()
            logger.info("%d/%d prompts decoded", len(rows), len(prompts))
    return rows


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``packlora decode``; returns the exit status (0 ok, 1 bad input, 2 bad flags)."""
    args = _parser().parse_args(argv)
    if not args.do_sample:
        given = [flag for flag, value in (("--temperature", args.temperature), ("--top-p", args.top_p),
                                          ("--seed", args.seed)) if value is not None]
        if given:
            _parser().error(f"{', '.join(given)} only apply with --do-sample; add --do-sample or drop them")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="packlora decode: %(message)s")
    try:
        rows = decode_file(
            args.checkpoint, args.input, args.output, args.limit,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, do_sample=args.do_sample,
            temperature=1.0 if args.temperature is None else args.temperature,
            top_p=1.0 if args.top_p is None else args.top_p,
            seed=args.seed, dtype=args.dtype, device=args.device, preset=args.preset,
            stop_strings=args.stop_string, no_stop_ids=args.no_stop_ids, stream=args.stream,
        ) if not args.stream else decode_file(
            args.checkpoint, args.input, args.output, args.limit,
            max_new_tokens=args.max_new_tokens, batch_size=1, do_sample=args.do_sample,
            temperature=1.0 if args.temperature is None else args.temperature,
            top_p=1.0 if args.top_p is None else args.top_p,
            seed=args.seed, dtype=args.dtype, device=args.device, preset=args.preset,
            stop_strings=args.stop_string, no_stop_ids=args.no_stop_ids, stream=True,
        )
    except (FileNotFoundError, ValueError) as e:  # RecordError is a ValueError
        print(f"packlora decode: error: {e}", file=sys.stderr)
        return 1
    by_stop = sum(r["stop_reason"] == "stop_id" for r in rows)
    by_string = sum(r["stop_reason"] == "stop_string" for r in rows)
    print(
        f"decoded {len(rows)} prompts: {by_stop} stopped at a stop id, "
        + (f"{by_string} at a stop string, " if args.stop_string else "")
        + f"{len(rows) - by_stop - by_string} hit max_new_tokens; wrote {args.output}"
    )
    if len(rows) - by_stop - by_string:
        print("  (replies that hit max_new_tokens are cut mid-answer: raise --max-new-tokens, "
              "or check that the checkpoint's stop ids are the ones it was trained to emit)")
    return 0


def _iter_prompts(path: Path) -> Iterator[Prompt]:
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path} (check --input)")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            src = Source(str(path), lineno)
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise RecordError(src, f"not valid UTF-8 ({e.reason} at byte {e.start}); re-encode the file as UTF-8")
            except json.JSONDecodeError as e:
                raise RecordError(src, f"invalid JSON ({e.msg} at column {e.colno}); fix or remove this line")
            if not isinstance(obj, dict):
                raise RecordError(src, f"expected a JSON object, got {type(obj).__name__}")
            # read_records wants an assistant turn in every chat (it is written for training);
            # a bare prompt gets a placeholder one for validation, dropped again below.
            obj, placeholder = _with_placeholder_answer(obj)
            record = parse_record(obj, src)
            if isinstance(record, TextRecord):
                raise RecordError(
                    src, "a {'text'} line has no chat to reply to; decode needs 'messages', "
                    "'conversations' or 'instruction' lines"
                )
            messages = [{"role": m.role, "content": m.content} for m in record.messages]
            reference = None
            if placeholder:
                messages.pop()
            elif messages[-1]["role"] == "assistant":
                reference = messages.pop()["content"]
            if not messages:
                raise RecordError(src, "the chat is a lone assistant turn; add the user message it answers")
            yield Prompt(tuple(messages), reference, src)


def _without_stop_ids(ckpt):
    """``ckpt`` decoding like a chat-unaware decoder (``--no-stop-ids``), with a loud warning."""
    import dataclasses

    from decoding.runaway import naive_stop_ids
    from decoding.stopping import format_stop_ids

    naive = tuple(naive_stop_ids(ckpt.tokenizer))
    logger.warning(
        "--no-stop-ids: EXPERIMENT ONLY. Ignoring the checkpoint's stop ids %s; stopping at %s alone, as a "
        "chat-unaware decoder would. Replies are expected to run on into invented turns.",
        format_stop_ids(ckpt.tokenizer, ckpt.stop_ids), format_stop_ids(ckpt.tokenizer, naive),
    )
    return dataclasses.replace(ckpt, stop_ids=naive)


def _streamer(ckpt, stop_strings, prompt: Prompt):
    from decoding.stop_strings import StopAwareStreamer, StopStringMatcher

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

    from presets import GUARDED_ACTIONS, apply_preset, load_preset

    p = load_preset(preset)
    vocab = ckpt.tokenizer.get_vocab()
    missing = [t for t in p.stop_tokens if t not in vocab]
    if missing:
        raise ValueError(f"--preset {p.name}: stop tokens {missing} are not single tokens of {ckpt.path}'s tokenizer")
    stop_ids = tuple(dict.fromkeys([*ckpt.stop_ids, *(vocab[t] for t in p.stop_tokens)]))
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


def _with_placeholder_answer(obj: dict) -> tuple[dict, bool]:
    for key, role_key, assistant_roles, answer in (
        ("messages", "role", {"assistant"}, {"role": "assistant", "content": _PLACEHOLDER}),
        ("conversations", "from", {"assistant", "gpt"}, {"from": "gpt", "value": _PLACEHOLDER}),
    ):
        turns = obj.get(key)
        if isinstance(turns, list) and turns and all(isinstance(t, dict) for t in turns):
            if not any(t.get(role_key) in assistant_roles for t in turns):
                return {**obj, key: [*turns, answer]}, True
            return obj, False
    return obj, False


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="packlora decode",
        description="Generate one reply per prompt from a packlora checkpoint, stopping at its stop ids.",
    )
    p.add_argument("checkpoint", help="checkpoint directory (LoRA adapter or full model)")
    p.add_argument("--input", required=True, help="JSONL prompts: messages / conversations / instruction lines")
    p.add_argument("--output", required=True, help="JSONL file to write, one line per prompt")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="most tokens per reply (default: the checkpoint's decoding.max_new_tokens, "
                        "else generation_config.json's max_new_tokens, else 512)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per generate call (default 8)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding (the default)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature > 0 (default 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: unseeded)")
    p.add_argument("--limit", type=_positive_int, default=None, help="decode only the first N prompts")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weight dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--stop-string", action="append", default=[], metavar="TEXT",
                   help="multi-token stop string, repeatable (e.g. $'\\nuser\\n'); each reply is cut before it")
    p.add_argument("--stream", action="store_true",
                   help="print each reply as it is generated (one prompt at a time; --batch-size is ignored)")
    p.add_argument("--no-stop-ids", action="store_true",
                   help="EXPERIMENTS ONLY: ignore the checkpoint's stop ids and stop at the tokenizer's eos "
                        "token alone, to see what the model does when nothing stops it at <|im_end|>")
    p.add_argument("--preset", default=None, help="style preset (zhang_henshui, shishuo, none, or a YAML path): "
                   "system prompt + guard for prompts without a system message, plus its stop tokens")
    return p
