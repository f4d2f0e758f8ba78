"""``packlora eval-runaway``: how often a checkpoint runs on past the end of its turn.

    packlora eval-runaway runs/exp1 --input runs/exp1/heldout.jsonl --output runaway.json
    packlora eval-runaway runs/exp1 --input held_out.jsonl --no-stop-ids --output naive.json
    packlora eval-runaway runs/exp1 --input held_out.jsonl --output sampled.json \
        --do-sample --temperature 0.7 --top-p 0.8 --top-k 20 --repetition-penalty 1.05 --seed 0
    packlora eval-runaway runs/exp1 --input held_out.jsonl --output preset.json --preset zhang_henshui \
        --stop-string $'\nuser\n'                 # the decode the README prescribes, measured

Input lines are chats as for ``packlora decode``; a chat's final assistant turn is the reference
answer (for the length ratio). Decoding is greedy unless ``--do-sample``; ``--preset`` and
``--stop-string`` work as for ``packlora decode`` (the preset's system prompt, guard and stop tokens;
multi-token stop strings). The metrics are defined
in ``decoding.runaway``; the report is one JSON object (``RunawayReport.to_dict`` plus the
decoding settings).

``--no-stop-ids`` is for experiments only: it decodes like a chat-unaware decoder, stopping only
at the tokenizer's eos token (end of text for Qwen2 base tokenizers), to measure what the
model does when nothing stops it at the end of turn. Never decode for real use that way.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from packlora.core.cli import cli_entry
from packlora.core.cli import add_debug_flag
from packlora.decoding.cli import _positive_int, add_sampling_flags, add_stop_flags, sampling_settings

logger = logging.getLogger(__name__)


@cli_entry("packlora eval-runaway")
def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 ok, 1 bad input, 2 bad flags."""
    parser = _parser()
    args = parser.parse_args(argv)
    sampling = sampling_settings(parser, args)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="packlora eval-runaway: %(message)s")
    from packlora.decoding.decode import _apply_preset, read_prompts
    from packlora.decoding.generate import load_checkpoint
    from packlora.decoding.runaway import evaluate_runaway

    prompts = read_prompts(args.input, args.limit)
    ckpt = load_checkpoint(args.checkpoint, args.dtype, args.device)
    if args.preset is not None:  # its system prompt and guard into every prompt, its stop tokens into the stop ids
        prompts, ckpt = _apply_preset(prompts, ckpt, args.preset)
    max_new_tokens = args.max_new_tokens or ckpt.max_new_tokens
    if args.no_stop_ids:
        print("packlora eval-runaway: --no-stop-ids: EXPERIMENT ONLY. Decoding stops at the tokenizer's eos "
              "token alone, ignoring the checkpoint's stop ids; replies are expected to run on.",
              file=sys.stderr)
    report = evaluate_runaway(
        ckpt.model, ckpt.fmt, [(p.messages, p.reference, str(p.source)) for p in prompts],
        ckpt.stop_ids, max_new_tokens, no_stop_ids=args.no_stop_ids, batch_size=args.batch_size, sampling=sampling,
        stop_strings=args.stop_string,
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = {"checkpoint": str(args.checkpoint), "input": str(args.input), "decoding": sampling.to_dict(),
            "preset": args.preset, "stop_strings": list(args.stop_string), **report.to_dict()}
    out.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    ratio = "n/a" if report.mean_length_ratio is None else f"{report.mean_length_ratio:.2f}"
    print(
        f"{report.num_prompts} prompts, stop ids {ckpt.fmt.format_ids(report.stop_ids)}: "
        f"runaway {report.runaway:.1%} (role leak {report.role_leak:.1%}, loop {report.loop:.1%}; "
        f"hit max_new_tokens {report.hit_max_new_tokens:.1%}), emitted end of turn {report.emitted_end_of_turn:.1%}, "
        f"stopped by stop id {report.stopped_by_stop_id:.1%}, mean length ratio {ratio}; wrote {out}"
    )
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="packlora eval-runaway",
                                description="Measure how often a checkpoint runs past the end of its turn.")
    p.add_argument("checkpoint", help="checkpoint directory (LoRA adapter or full model)")
    p.add_argument("--input", required=True, help="JSONL held-out chats (final assistant turn = reference)")
    p.add_argument("--output", required=True, help="JSON report to write")
    p.add_argument("--no-stop-ids", action="store_true",
                   help="EXPERIMENT ONLY: stop at the tokenizer's eos token alone, not the checkpoint's stop ids")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="tokens per reply (default: the checkpoint's max_new_tokens)")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per generate call (default 8)")
    add_sampling_flags(p)
    add_stop_flags(p)
    add_debug_flag(p)
    p.add_argument("--limit", type=_positive_int, default=None, help="evaluate only the first N prompts")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    p.add_argument("--device", default=None, help="e.g. cpu, cuda (default: cuda if available)")
    return p
