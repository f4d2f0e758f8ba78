"""The ``packlora`` console script: one entry point, one subcommand per job.

    packlora launch  CONFIG [key.sub=value ...] [--nproc-per-node N] [--dry-run]   # start training
    packlora slurm   CONFIG [key.sub=value ...] --nodes N --gpus-per-node G [--submit [--wait]]
    packlora train   CONFIG [key.sub=value ...]      # one process of a run (what `launch` starts)
    packlora inspect CONFIG [key.sub=value ...] [--json]   # label audit and packing report
    packlora decode  CHECKPOINT --input prompts.jsonl --output out.jsonl [--preset NAME]
    packlora subset  --input IN.jsonl --output OUT.jsonl --ratio 0.2 --seed S [--tokenizer DIR]
    packlora export  CHECKPOINT --merge OUT_DIR        # merged model for AutoModelForCausalLM / serving
    packlora eval-runaway CHECKPOINT --input held_out.jsonl [--no-stop-ids] --output report.json

Each subcommand's own ``--help`` lists its flags; ``--debug`` (every subcommand) shows the
traceback of an error instead of its one-line message. ``packlora --version`` prints the version.
"""
from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help). Modules are imported lazily so `packlora --help`
# does not pay for torch/deepspeed imports.
SUBCOMMANDS = {
    "launch": ("packlora.launcher.cli", "build and run the deepspeed/torchrun command for a config"),
    "slurm": ("packlora.launcher.slurm_cli", "write (and submit) an sbatch script: one launcher task per node"),
    "train": ("packlora.train", "run one training process (started by `launch`)"),
    "inspect": ("packlora.training.inspect_cli", "label audit: what is trained, packing efficiency"),
    "decode": ("packlora.decoding.cli", "generate replies from a checkpoint, stopping at its stop IDs"),
    "subset": ("packlora.data_utils.subset", "reproducible length-stratified subset of a JSONL file, with a manifest"),
    "export": ("packlora.training.export", "merge a LoRA checkpoint into a standard model directory"),
    "eval-runaway": ("packlora.decoding.eval_cli", "rate of replies that run on past the end of their turn"),
}


def _usage() -> str:
    lines = ["usage: packlora SUBCOMMAND [args...] [--debug]", "       packlora --version", "", "subcommands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "SUBCOMMAND --help lists its flags; --debug shows an error's traceback instead of its one line."]
    return "\n".join(lines)


def version() -> str:
    """The installed distribution's version (``setup.cfg``), e.g. ``0.1.0``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("packlora")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"packlora {version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"packlora: unknown subcommand {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
