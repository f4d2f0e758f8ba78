"""``packlora decode``: generate a reply for every prompt of a JSONL file (``decoding/decode.py``).

    packlora decode runs/exp1 --input prompts.jsonl --output replies.jsonl
    packlora decode CKPT --input held_out.jsonl --output out.jsonl --do-sample --temperature 0.7 --seed 0
    packlora decode CKPT --input held_out.jsonl --output out.jsonl --do-sample --temperature 0.7 \
        --top-p 0.8 --top-k 20 --repetition-penalty 1.05 --seed 0     # Qwen2.5-Instruct's defaults
"""
from __future__ import annotations

import argparse
import logging

from packlora.core.cli import add_debug_flag, cli_entry
from packlora.decoding.decode import decode_file, read_prompts  # noqa: F401  (read_prompts: the library API)

logger = logging.getLogger(__name__)


@cli_entry("packlora decode")
def main(argv: list[str] | None = None) -> int:
    """Entry point of ``packlora decode``; returns the exit status (0 ok, 1 bad input, 2 bad flags)."""
    parser = _parser()
    args = parser.parse_args(argv)
    sampling = sampling_settings(parser, args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="packlora decode: %(message)s")
    rows = decode_file(
        args.checkpoint, args.input, args.output, args.limit,
        max_new_tokens=args.max_new_tokens, batch_size=1 if args.stream else args.batch_size,
        dtype=args.dtype, device=args.device, preset=args.preset,
        stop_strings=args.stop_string, no_stop_ids=args.no_stop_ids, stream=args.stream, sampling=sampling,
    )
    by_stop = sum(r["stop_reason"] == "stop_id" for r in rows)
    by_string = sum(r["stop_reason"] == "stop_string" for r in rows)
    print(
        f"decoded {len(rows)} prompts: {by_stop} stopped at a stop id, "
        + (f"{by_string} at a stop string, " if args.stop_string else "")
        + f"{len(rows) - by_stop - by_string} hit max_new_tokens; wrote {args.output}"
    )
    if len(rows) - by_stop - by_string:
        print(max_new_tokens_hint(args.checkpoint))
    return 0


def max_new_tokens_hint(checkpoint) -> str:
    """What to do about replies that hit max_new_tokens. "Check the stop ids" only where it can be
    right: an adapter on a base built at random from ``model.config`` (the demo's) never learned to
    end a turn, whatever its stop ids."""
    from packlora.core.checkpoint import CheckpointInfo

    if CheckpointInfo.read(checkpoint).adapter_on_random_base:
        return ("  (expected here: this adapter's base was built at random from model.config, so the model never "
                "learned to end its turn and no stop id can end it. To see a model that learned to stop, run "
                "`python scripts/see_it_stop.py` in the packlora repository)")
    return ("  (replies that hit max_new_tokens are cut mid-answer: raise --max-new-tokens, "
            "or check that the checkpoint's stop ids are the ones it was trained to emit)")


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The decoding flags shared by ``decode`` and ``eval-runaway``; read back by ``sampling_settings``."""
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding (the default)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature > 0 (default 1.0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default 1.0)")
    p.add_argument("--top-k", type=_nonnegative_int, default=None,
                   help="sample among the K most likely tokens only (with --do-sample; default 0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 0; divides the logits of tokens already in the row (CTRL); 1.0 = off (default), "
                        "Qwen2.5-Instruct uses 1.05")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (default: unseeded)")


def add_stop_flags(p: argparse.ArgumentParser) -> None:
    """``--preset`` and ``--stop-string``, shared by ``decode`` and ``eval-runaway``: the decode the
    README prescribes can be measured as it is run."""
    p.add_argument("--stop-string", action="append", default=[], metavar="TEXT",
                   help="multi-token stop string, repeatable (e.g. $'\\nuser\\n'); each reply is cut before it")
    p.add_argument("--preset", default=None, help="style preset (zhang_henshui, shishuo, none, or a YAML path): "
                   "system prompt + guard for prompts without a system message, plus its stop tokens")


def sampling_settings(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """The ``Sampling`` the sampling flags ask for, built once; a sampling-only flag without
    ``--do-sample``, or a bad value, is a flag error (exit 2) naming it."""
    from packlora.decoding.generate import Sampling

    given = [flag for flag, value in (("--temperature", args.temperature), ("--top-p", args.top_p),
                                      ("--top-k", args.top_k), ("--seed", args.seed)) if value is not None]
    if given and not args.do_sample:
        parser.error(f"{', '.join(given)} only apply with --do-sample; add --do-sample or drop them")
    try:
        return Sampling(do_sample=args.do_sample, temperature=1.0 if args.temperature is None else args.temperature,
                        top_p=1.0 if args.top_p is None else args.top_p, top_k=args.top_k or 0,
                        repetition_penalty=args.repetition_penalty, seed=args.seed)
    except ValueError as e:
        parser.error(str(e))


def _nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


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
    add_sampling_flags(p)
    add_debug_flag(p)
    p.add_argument("--limit", type=_positive_int, default=None, help="decode only the first N prompts")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weight dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--stream", action="store_true",
                   help="print each reply as it is generated (one prompt at a time; --batch-size is ignored)")
    p.add_argument("--no-stop-ids", action="store_true",
                   help="EXPERIMENTS ONLY: ignore the checkpoint's stop ids and stop at the tokenizer's eos "
                        "token alone, to see what the model does when nothing stops it at the end of turn")
    add_stop_flags(p)
    return p
