"""``packlora launch``: build the deepspeed/torchrun command for a config, print it, run it.

    packlora launch configs/sft.yaml training.max_steps=5                 # all local GPUs, or 2 CPU procs
    packlora launch configs/sft.yaml --nproc-per-node 2 --dry-run         # print the command only
    packlora launch configs/sft.yaml --launcher torchrun --nnodes 2 --node-rank 1 \\
        --master-addr 10.0.0.1 --master-port 29500                        # run on each node
    packlora launch configs/sft.yaml --hostfile hosts --master-port 29500 # deepspeed over ssh
    packlora launch configs/sft.yaml --launcher slurm --nnodes 2 --gpus-per-node 8  # = packlora slurm --submit --wait

This module holds the impure parts (CUDA detection, a free port, the environment, the
subprocess); the command itself comes from the pure ``launcher.commands``. The rendezvous port is
``--master-port``, else ``MASTER_PORT`` from the environment, else a free one (single node).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from packlora.core.cli import add_debug_flag, cli_entry
from packlora.launcher.commands import OOM_HINT, build_argv, format_command
from packlora.launcher.hostfile import HostfileError, read_hostfile
from packlora.launcher.ports import choose_port, explicit_port
from packlora.launcher.spec import LAUNCHERS, LaunchSpec
from packlora.launcher.supervise import run_supervised, stopped_message
from packlora.training.run_dir import CHECKED_ENV, OVERWRITE_FLAG

CPU_NPROC_PER_NODE = 2
"""Processes per node when no GPU is visible: CPU processes talking over gloo."""


def _validate_config(args, parser):
    """Load and check the config with its overrides here, once, before any process starts, so a bad
    key fails in seconds instead of in every rank after start-up; ``--dry-run`` checks exactly the
    same. Checked: every key and type (``training:`` against ``transformers.TrainingArguments``),
    every path, every record of the data (a bad line is an error naming ``file:line``; skipped when
``data.cache_dir`` says these very bytes were already read without error), and, on node
    0, ``output_dir`` (``training/run_dir.py``: no second run into a directory holding one, unless
    ``--overwrite``; no resume from a checkpoint with no steps left). When the training processes will
    run on this machine (not Slurm, no hostfile), also what this machine cannot run (an attention
    backend or dtype that needs CUDA, ``training.model.check_runs_here``) and the values
    ``TrainingArguments`` itself refuses (it is built once here). A problem with a key set on the
    command line says "(set on the command line)". Returns the loaded ``RunConfig``."""
    from packlora.core.config import config_source, mark_command_line
    from packlora.core.errors import InputError, PackloraError
    from packlora.data_utils.dataset import mark_records_checked, read_stage, records_checked
    from packlora.training.config import ConfigError
    from packlora.training.preflight import load_and_check

    runs_here = args.launcher != "slurm" and args.hostfile is None
    try:
        cfg = load_and_check(args.config, args.overrides, run_dir=args.node_rank == 0, overwrite=args.overwrite)
        for name in ("train", "eval"):  # every record parsed here, in seconds, not after every rank has started
            sources, d = cfg.data.sources(name), cfg.data
            if sources and not records_checked(sources, d.format, d.on_error, d.cache_dir):  # read once per content
                read_stage(sources, d.format, d.on_error)
                mark_records_checked(sources, d.format, d.on_error, d.cache_dir)
        if runs_here:
            from packlora.training.model import check_runs_here

            try:
                check_runs_here(cfg.model, _cuda_device_count() > 0)
                _check_training_arguments(cfg)
            except InputError as err:
                problems = err.problems if isinstance(err, ConfigError) else [str(err)]
                raise ConfigError(mark_command_line(problems, args.overrides),
                                  config_source(args.config, args.overrides)) from None
    except PackloraError as err:  # a bad config, data file or record, no example left: one line each
        parser.error(str(err))
    return cfg


def _check_training_arguments(cfg) -> None:
    """Build the run's ``TrainingArguments`` once, as every process will (no side effects), so the
    values transformers refuses fail here. Raises ``ConfigError``."""
    from packlora.training.recipe import build_training_arguments

    build_training_arguments(cfg)


@cli_entry("packlora launch")
def main(argv: list[str]) -> int:
    """Run ``packlora launch ARGV``.

    Returns:
        0 after ``--dry-run``; otherwise the launcher's exit code.

    Raises:
        SystemExit: (code 2, message on stderr) for unknown flags, invalid settings
            or a missing config file, as argparse does.
    """
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    if not Path(args.config).is_file():
        parser.error(f"config file not found: {args.config!r} (relative to {os.getcwd()})")
    cfg = _validate_config(args, parser)
    if args.launcher == "slurm":
        return _slurm(args, parser, cfg)
    if args.gpus_per_node is not None:
        parser.error(
            f"--gpus-per-node is only read by --launcher slurm, got it with {args.launcher}; here "
            "--nproc-per-node sets the processes of this machine (default: one per visible GPU)"
        )

    spec = _spec(args, parser)
    command = build_argv(spec)
    print(format_command(command, spec.env), flush=True)
    if args.dry_run:
        return 0
    if shutil.which(command[0]) is None:
        parser.error(f"{command[0]!r} is not on PATH; activate the environment packlora is installed in")
    if args.overwrite and args.node_rank == 0:
        _clear_old_run(cfg.output_dir)
    # The processes need not check output_dir again; unbuffered, their output reaches the pipe as written.
    env = {**os.environ, **dict(spec.env), CHECKED_ENV: "1", "PYTHONUNBUFFERED": "1"}
    outcome = run_supervised(command, env)
    if outcome.stop_signal is not None:
        print(stopped_message(outcome), file=sys.stderr, flush=True)
        return 128 + outcome.stop_signal
    if outcome.returncode != 0 and outcome.killed_by_sigkill:
        print(f"packlora launch: a training process was {OOM_HINT} (the start-up log estimates the memory per rank)",
              file=sys.stderr, flush=True)
    return outcome.returncode


def _clear_old_run(output_dir: str) -> None:
    from packlora.training.run_dir import clear_run

    removed = clear_run(output_dir)
    if removed:
        print(f"packlora launch: --overwrite: deleted the old run in {output_dir} ({', '.join(removed)})",
              file=sys.stderr, flush=True)


def _spec(args: argparse.Namespace, parser: argparse.ArgumentParser) -> LaunchSpec:
    """Fill in the defaults that depend on this machine, then validate. Exits via ``parser.error``."""
    cuda = _cuda_device_count()
    nproc = args.nproc_per_node
    nnodes = args.nnodes if args.nnodes is not None else 1
    master_addr = args.master_addr or "127.0.0.1"
    if args.hostfile is not None and args.launcher == "deepspeed":
        try:
            hosts = read_hostfile(args.hostfile)
        except HostfileError as err:
            parser.error(str(err))
        slots = sorted({h.slots for h in hosts})
        if args.nnodes is not None and args.nnodes != len(hosts):
            parser.error(f"--nnodes {args.nnodes} but {args.hostfile} lists {len(hosts)} host(s); drop --nnodes")
        if len(slots) > 1 or (nproc is not None and slots != [nproc]):
            parser.error(
                f"{args.hostfile} gives slots={','.join(map(str, slots))}"
                + (f" but --nproc-per-node is {nproc}" if nproc is not None else " (must be the same on every host)")
                + "; give every host the same slots, one per GPU"
            )
        nnodes, nproc = len(hosts), slots[0]
        if args.master_addr is None and nnodes > 1:
            master_addr = hosts[0].name  # deepspeed starts rank 0 on the first host
    if nproc is None:
        nproc = cuda or CPU_NPROC_PER_NODE
    cpus = _usable_cpus()
    if not cuda and nproc > cpus:
        print(
            f"packlora launch: warning: {nproc} CPU processes (--nproc-per-node) on the {cpus} CPU core(s) this "
            f"machine lets us use and no GPU: the processes will share cores and every step slows down; "
            f"use --nproc-per-node {cpus} or fewer",
            file=sys.stderr,
        )
    try:
        port, note = explicit_port(args.master_port, os.environ)
    except ValueError as err:
        parser.error(str(err))
    if note:
        print(f"packlora launch: {note}", file=sys.stderr)
    if port is None:
        if nnodes > 1:
            parser.error(
                "--master-port is required with --nnodes > 1 (or MASTER_PORT in the environment): every node "
                "must use the same port"
            )
        try:
            port = choose_port(addr=master_addr)
        except (OSError, ValueError) as err:
            parser.error(f"no free port on --master-addr {master_addr!r} ({err}); pass --master-port")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if args.launcher == "deepspeed" and cuda and visible:
        if [d.strip() for d in visible.split(",")][:nproc] != [str(i) for i in range(nproc)]:
            parser.error(
                f"deepspeed ignores CUDA_VISIBLE_DEVICES={visible} when given --num_accelerators and would use "
                f"GPUs 0..{nproc - 1}; unset CUDA_VISIBLE_DEVICES, or use --launcher torchrun, which respects it"
            )
    # torch and gloo each start one thread per core in every process; on CPU that
    # oversubscribes the cores (one step: 0.61 s unset vs 0.20 s with 1 under deepspeed).
    env = () if cuda or "OMP_NUM_THREADS" in os.environ else (("OMP_NUM_THREADS", "1"),)
    try:
        return LaunchSpec(
            launcher=args.launcher,
            nnodes=nnodes,
            nproc_per_node=nproc,
            node_rank=args.node_rank,
            master_addr=master_addr,
            master_port=port,
            hostfile=args.hostfile,
            no_ssh=args.no_ssh,
            config=args.config,
            overrides=tuple(args.overrides),
            env=env,
        )
    except ValueError as err:
        parser.error(str(err))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="packlora launch",
        description="Start 'python -m packlora.train CONFIG [key.sub=value ...]' on every process.",
    )
    p.add_argument("config", help="training YAML config; must exist")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, passed on in order")
    p.add_argument(
        "--launcher",
        choices=(*LAUNCHERS, "slurm"),
        default="deepspeed",
        help="slurm: submit a batch job and wait, as 'packlora slurm ... --submit --wait' (default: %(default)s)",
    )
    p.add_argument("--nnodes", type=int, help="number of machines (default: the hostfile's hosts, else 1)")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        help=f"processes per machine (default: the number of visible CUDA GPUs, "
        f"or {CPU_NPROC_PER_NODE} CPU processes with gloo when there are none)",
    )
    p.add_argument(
        "--node-rank", type=int, default=0, help="this machine's index, torchrun or deepspeed --no-ssh (default: 0)"
    )
    p.add_argument(
        "--hostfile",
        help="deepspeed hostfile ('host slots=N' lines); required for deepspeed with --nnodes > 1. "
        "--nnodes and --nproc-per-node default to its hosts and slots",
    )
    p.add_argument(
        "--no-ssh",
        action="store_true",
        help="deepspeed: start only this node's processes (run the command on every node with --node-rank)",
    )
    p.add_argument(
        "--master-addr", help="address of node 0 (default: the hostfile's first host, else 127.0.0.1)"
    )
    p.add_argument(
        "--master-port",
        type=int,
        help="rendezvous port on node 0 (default: MASTER_PORT from the environment, else a free port, "
        "single node only)",
    )
    p.add_argument(
        "--gpus-per-node",
        type=int,
        help="--launcher slurm only: GPUs per Slurm node (0: CPU processes); default: the config's "
        "gpus_per_node, else the partition's GRES, else an error. Never this machine's GPUs",
    )
    p.add_argument(
        OVERWRITE_FLAG,
        action="store_true",
        help="when output_dir already holds a run (checkpoints or packlora_config.yaml), delete that run first "
        "(only the files packlora writes; node 0 only). Without it such a launch is refused",
    )
    p.add_argument("--dry-run", action="store_true",
                   help="check everything the launch checks, print the command and exit; starts nothing, deletes nothing")
    add_debug_flag(p)
    return p


def _usable_cpus() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or a Slurm step's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _cuda_device_count() -> int:
    """Visible CUDA devices, 0 without CUDA. Imports torch, so only called after parsing."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _slurm(args: argparse.Namespace, parser: argparse.ArgumentParser, cfg) -> int:
    """``--launcher slurm``: the same job through ``packlora slurm``, one launcher task per node, built
    from the config already loaded (``cfg``)."""
    from packlora.launcher import slurm_cli

    if args.hostfile is not None or args.no_ssh or args.node_rank != 0 or args.master_addr is not None:
        parser.error(
            "--hostfile, --no-ssh, --node-rank and --master-addr come from Slurm with --launcher slurm; drop them"
        )
    argv = [args.config, *args.overrides, "--nodes", str(args.nnodes or 1)]
    if args.gpus_per_node is not None:  # never this machine's GPUs: the compute nodes may differ
        argv += ["--gpus-per-node", str(args.gpus_per_node)]
    if args.nproc_per_node is not None:
        argv += ["--nproc-per-node", str(args.nproc_per_node)]
    if args.master_port is not None:
        argv += ["--master-port", str(args.master_port)]
    argv += [OVERWRITE_FLAG] if args.overwrite else []
    argv += ["--dry-run"] if args.dry_run else ["--submit", "--wait"]
    return slurm_cli.main(argv, cfg=cfg)
