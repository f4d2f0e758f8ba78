"""One training process: parse, load the config, run the recipe (``training/recipe.py``).

Started once per process by ``packlora launch`` (deepspeed or torchrun); by hand::

    deepspeed --num_accelerators 2 --no_local_rank --module packlora.train configs/shishuo_tiny.yaml

The recipe decides (setup -> data -> train -> save -> decode held-out); this entry point wires in
the decoding it needs, which training does not import.
"""
from __future__ import annotations

import argparse
import os
import sys

from packlora.core.cli import add_debug_flag, cli_entry, description


@cli_entry("packlora train")
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="packlora train", description=description(__doc__))
    parser.add_argument("config", help="YAML run config")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the run output_dir already holds first (rank 0, before the process group exists)")
    add_debug_flag(parser)
    ns = parser.parse_intermixed_args(argv)  # overrides before or after the flags

    from packlora.training.process import start_process

    start_process()  # quiet library noise, DeepSpeed's CPU set-up, the rank in every log line

    from packlora.decoding.decode import decode_file
    from packlora.decoding.runaway import evaluate_runaway
    from packlora.training import run_dir
    from packlora.training.distributed import rank
    from packlora.training.preflight import load_and_check
    from packlora.training.recipe import TrainingRecipe

    checked = os.environ.get(run_dir.CHECKED_ENV) == "1"  # `packlora launch` checked output_dir already
    cfg = load_and_check(ns.config, ns.overrides, run_dir=not checked, overwrite=ns.overwrite)
    if ns.overwrite and not checked and rank() == 0:  # no rank writes before the rendezvous: safe here
        run_dir.clear_run(cfg.output_dir)
    return TrainingRecipe(cfg, decode_heldout=decode_file, evaluate_runaway=evaluate_runaway).run()


if __name__ == "__main__":
    sys.exit(main())
