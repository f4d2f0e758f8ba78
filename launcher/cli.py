"""``packlora launch``: build the deepspeed/torchrun command for a config, print it, run it.

    packlora launch configs/sft.yaml training.max_steps=5                 # all local GPUs, or 2 CPU procs
    packlora launch configs/sft.yaml --nproc-per-node 2 --dry-run         # print the command only
    packlora launch configs/sft.yaml --launcher torchrun --nnodes 2 --node-rank 1 \\
        --master-addr 10.0.0.1 --master-port 29500                        # run on each node

This module holds the impure parts (CUDA detection, a free port, the environment, the
subprocess); the command itself comes from the pure ``launcher.commands``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
from pathlib import Path

from launcher.commands import build_argv, format_command
from launcher.spec import LAUNCHERS, LaunchSpec

CPU_NPROC_PER_NODE = 2
"""Processes per node when no GPU is visible: CPU processes talking over gloo."""


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

    spec = _spec(args, parser)
    command = build_argv(spec)
    print(format_command(command, spec.env), flush=True)
    if args.dry_run:
        return 0
    if shutil.which(command[0]) is None:
        parser.error(f"{command[0]!r} is not on PATH; activate the environment packlora is installed in")
    return subprocess.run(command, env={**os.environ, **dict(spec.env)}).returncode


def _spec(args: argparse.Namespace, parser: argparse.ArgumentParser) -> LaunchSpec:
    """Fill in the defaults that depend on this machine, then validate. Exits via ``parser.error``."""
    cuda = _cuda_device_count()
    nproc = args.nproc_per_node if args.nproc_per_node is not None else cuda or CPU_NPROC_PER_NODE
    port = args.master_port
    if port is None:
        if args.nnodes > 1:
            parser.error("--master-port is required with --nnodes > 1: every node must use the same port")
        try:
            port = _free_port(args.master_addr)
        except OSError as err:
            parser.error(f"no free port on --master-addr {args.master_addr!r} ({err}); pass --master-port")
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
            nnodes=args.nnodes,
            nproc_per_node=nproc,
            node_rank=args.node_rank,
            master_addr=args.master_addr,
            master_port=port,
            hostfile=args.hostfile,
            config=args.config,
            overrides=tuple(args.overrides),
            env=env,
        )
    except ValueError as err:
        parser.error(str(err))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="packlora launch",
        description="Start `python -m training.train CONFIG [key.sub=value ...]` on every process.",
    )
    p.add_argument("config", help="training YAML config; must exist")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, passed on in order")
    p.add_argument("--launcher", choices=LAUNCHERS, default="deepspeed", help="default: %(default)s")
    p.add_argument("--nnodes", type=int, default=1, help="number of machines (default: %(default)s)")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        help=f"processes per machine (default: the number of visible CUDA GPUs, "
        f"or {CPU_NPROC_PER_NODE} CPU processes with gloo when there are none)",
    )
    p.add_argument("--node-rank", type=int, default=0, help="this machine's index, torchrun only (default: 0)")
    p.add_argument("--hostfile", help="MPI-style hostfile, deepspeed only; required for --nnodes > 1")
    p.add_argument("--master-addr", default="127.0.0.1", help="address of node 0 (default: %(default)s)")
    p.add_argument(
        "--master-port",
        type=int,
        help="rendezvous port on node 0 (default: a free port, single node only)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the command and exit")
    return p


def _cuda_device_count() -> int:
    """Visible CUDA devices, 0 without CUDA. Imports torch, so only called after parsing."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _free_port(addr: str) -> int:
    """A TCP port that is free on ``addr`` right now (the OS picks it when binding port 0).

    Raises:
        OSError: if ``addr`` is not an address of this machine.
    """
    family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, 0, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as sock:
        sock.bind(sockaddr)
        return sock.getsockname()[1]
