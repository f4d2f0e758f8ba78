"""``packlora inspect CONFIG [key=value ...] [--json]``: the label audit, without training.

Tokenises and packs exactly as training would (same cache), then reports what is trained::

    {"records": 3434, "heldout": 4, "examples": 3430, "dropped": {}, "rows": 370, "packing_efficiency": 0.982,
     "supervised_tokens": 75834, "role_markers_in_labels": 0, "control_tokens_in_labels": 0,
     "turns_with_end_of_turn_trained": 3919, "assistant_turns": 3919, "chat_format": "chatml", ...,
     "sources": {"../shared/data/shishuo/stage2_rewrite.jsonl":
                 {"lines_read": 3434, "records": 3434, "skipped": {}, "in_mix": 3430}},
     "evaluation": {}}

Without ``--json`` it prints the first packed rows with trained tokens in green (``--rows N``),
followed by the same counts. Exit status 1 when the label audit fails, by the rule training applies
(``data_utils.audit.judge_labels``): a role-marker or control token other than the end of turn
carries a label, or some assistant turn's end-of-turn token is not trained.
"""
from __future__ import annotations

import argparse
import json
import sys

from packlora.core.cli import add_debug_flag, cli_entry

JSON_KEYS = (
    "records", "heldout", "examples", "dropped", "rows", "packing_efficiency", "supervised_tokens",
    "role_markers_in_labels", "control_tokens_in_labels", "turns_with_end_of_turn_trained", "assistant_turns",
    "chat_format", "chats_with_guard", "chats_split_per_turn", "render_mismatch", "messages_with_control_text",
    "sources", "evaluation",
)


@cli_entry("packlora inspect")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="packlora inspect", description="Label audit and packing report.")
    parser.add_argument("config", help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--rows", type=int, default=1, help="packed rows to show in the coloured view (default 1)")
    parser.add_argument("--no-color", action="store_true", help="mark trained spans with [[...]] instead of colour")
    add_debug_flag(parser)
    ns = parser.parse_intermixed_args(argv)  # overrides before or after the flags

    from datasets.utils.logging import disable_progress_bar

    from packlora.data_utils.audit import judge_labels, render_row
    from packlora.training.data import load_run_preset, prepare_run_data
    from packlora.training.model import load_tokenizer
    from packlora.training.preflight import load_and_check

    if ns.json:
        disable_progress_bar()
    cfg = load_and_check(ns.config, ns.overrides, training_arguments=False)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_run_data(cfg, cfg.data.chat_format_for(tokenizer), load_run_preset(cfg.preset))
    report = data.report.to_dict()
    summary = {k: report[k] for k in JSON_KEYS}
    if ns.json:
        print(json.dumps(summary, ensure_ascii=False))
    else:
        color = not ns.no_color and sys.stdout.isatty()
        for i in range(min(ns.rows, len(data.rows))):
            row = data.rows[i]
            print(f"── packed row {i}: {len(row['input_ids'])} tokens, segments {row['seq_lens']} "
                  f"({'green' if color else '[[...]]'} = trained, ‖ = segment start) ──")
            print(render_row(row, tokenizer, color=color))
        print("──")
        width = max(map(len, summary))
        for k, v in summary.items():
            if k == "sources":  # one line per source: its lines, unique records, records in the training mix
                for name, counts in v.items():
                    print(f"{'source':<{width}}  {name}: " + ", ".join(_source_count(c, n) for c, n in counts.items()
                                                                        if n != {}))
            elif k == "evaluation":
                print(f"{k:<{width}}  " + (", ".join(f"{c} {n}" for c, n in v.items()) if v.get("records")
                                           else "none (no data.eval or data.eval_split)"))
            else:
                print(f"{k:<{width}}  {v}")
    verdict = judge_labels(data.report, legacy=cfg.data.labels == "legacy_full_sequence")
    for problem in verdict.problems:
        print(f"label audit failed: {problem}", file=sys.stderr)
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())


def _source_count(name: str, n) -> str:
    """One count of a source's line in the text report.

    >>> _source_count("lines_read", 3434)
    'lines_read 3434'
    >>> _source_count("skipped", {"blank_line": 2, "invalid_json": 1})
    'skipped 3 (blank_line 2, invalid_json 1)'
    """
    if isinstance(n, dict):
        return f"{name} {sum(n.values())} (" + ", ".join(f"{reason} {k}" for reason, k in n.items()) + ")"
    return f"{name} {n}"
