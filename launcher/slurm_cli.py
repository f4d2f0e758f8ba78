"""``packlora slurm``: write the sbatch script for a config, print the ``sbatch`` command, submit it.

    packlora slurm configs/sft.yaml --nodes 2 --gpus-per-node 8 --partition gpu --time 04:00:00
    packlora slurm configs/sft.yaml --nodes 1 --gpus-per-node 0 --dry-run        # print the script only
    packlora slurm configs/sft.yaml --nodes 2 --gpus-per-node 8 --submit --wait  # block until it ends

The config is loaded (and validated) here, before anything is queued; its ``output_dir`` must be
on a file system every node sees (checkpoints and TensorBoard logs go there). The script, the
hostfile (deepspeed) and the Slurm log ``slurm-<jobid>.out`` go to ``--output``, by default
``<output_dir>/slurm``. The script text comes from the pure ``launcher.slurm.sbatch_script``.

GPUs per node come from ``--gpus-per-node``, else the config's ``gpus_per_node``, else the
partition's GRES when every node has the same count (``launcher.sinfo``), never from this machine;
otherwise it is an error naming the flag. The rendezvous port: ``--master-port``, else
``MASTER_PORT`` from the environment, else chosen on the first node when the job starts.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from packlora.core.cli import add_debug_flag, cli_entry
from packlora.launcher import sinfo
from packlora.launcher.ports import explicit_port
from packlora.launcher.slurm import DEFAULT_CPUS_PER_GPU, DEFAULT_WARN_BEFORE_S, SLURM_LAUNCHERS, SlurmSpec, sbatch_script

SCRIPT_NAME = "packlora.sbatch"


@cli_entry("packlora slurm")
def main(argv: list[str], cfg=None) -> int:
    """Run ``packlora slurm ARGV``; ``cfg`` is the config already loaded with its overrides (by
    ``packlora launch --launcher slurm``), else it is loaded here.

    Returns:
        0 after writing (and, with ``--submit``, queueing) the job; with ``--wait``, the job's
        exit code as ``sbatch --wait`` reports it.

    Raises:
        SystemExit: (code 2, message on stderr) for bad flags, a bad config, or no ``sbatch``.
    """
    parser = _parser()
    args = parser.parse_intermixed_args(argv)
    if args.wait and not args.submit:
        parser.error("--wait needs --submit")
    spec = build_spec(args, parser, cfg)
    script = sbatch_script(spec)
    path = Path(spec.output) / SCRIPT_NAME
    sbatch = ["sbatch", "--parsable", *(["--wait"] if args.wait else []), str(path)]
    if args.dry_run:
        print(script, end="")
        print(f"# then: {shlex.join(sbatch)}", flush=True)
        return 0
    if args.overwrite:
        from packlora.training.run_dir import clear_run

        removed = clear_run(spec.output_dir)
        if removed:
            print(f"packlora slurm: --overwrite: deleted the old run in {spec.output_dir} ({', '.join(removed)})",
                  file=sys.stderr, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script, encoding="utf-8")
    print(f"wrote {path}\n{shlex.join(sbatch)}", flush=True)
    if not args.submit:
        return 0
    if shutil.which("sbatch") is None:
        parser.error("sbatch is not on PATH: run this on a Slurm login node (or set SLURM_CONF), or drop --submit")
    with subprocess.Popen(sbatch, stdout=subprocess.PIPE, text=True) as proc:
        # --parsable prints "jobid[;cluster]" as soon as the job is queued, --wait then blocks
        job = (proc.stdout.readline() if proc.stdout else "").strip().split(";")[0]
        log = Path(spec.output) / f"slurm-{job}.out"
        if job:
            print(f"job {job} queued: Slurm log {log}; {_paths(spec)}", flush=True)
        rest = proc.communicate()[0]
    if rest:
        print(rest, end="")
    if args.wait:
        print(f"job {job} ended with exit code {proc.returncode}: {_paths(spec)}", flush=True)
        if proc.returncode != 0 and log.is_file():
            tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-40:]
            print("\n".join(["last lines of the Slurm log:", *tail]), file=sys.stderr)
    return proc.returncode


def _paths(spec: SlurmSpec) -> str:
    return f"checkpoints in {spec.output_dir}, TensorBoard logs in {spec.output_dir}/runs"


def build_spec(args: argparse.Namespace, parser: argparse.ArgumentParser, cfg=None) -> SlurmSpec:
    """The ``SlurmSpec`` for parsed flags and the config (``cfg``, else loaded here for its
    ``output_dir``); exits via ``parser.error`` on a bad config or bad flags."""
    from packlora.core.config import config_source, mark_command_line
    from packlora.training.config import ConfigError, load_config
    from packlora.training.preflight import run_dir_problems

    if cfg is None:  # (packlora launch --launcher slurm has checked all of this already)
        try:
            cfg = load_config(args.config, args.overrides)
            problems = run_dir_problems(cfg, args.overwrite)  # one run per output_dir (training/run_dir.py)
            if problems:
                raise ConfigError(mark_command_line(problems, args.overrides), config_source(args.config, args.overrides))
        except (FileNotFoundError, ConfigError) as err:
            parser.error(str(err))
    output_dir = str(Path(cfg.output_dir).resolve())
    output = str(Path(args.output).resolve()) if args.output else f"{output_dir}/slurm"
    gpus = _gpus_per_node(args, cfg, parser)
    try:
        port, note = explicit_port(args.master_port, os.environ)
    except ValueError as err:
        parser.error(str(err))
    if note:
        print(f"packlora slurm: {note}", file=sys.stderr)
    try:
        return SlurmSpec(
            nodes=args.nodes,
            gpus_per_node=gpus,
            nproc_per_node=args.nproc_per_node,
            cpus_per_process=args.cpus_per_gpu,
            warn_before=args.warn_before,
            requeue=not args.no_requeue,
            launcher=args.launcher,
            master_port=port,
            partition=args.partition,
            time=args.time,
            account=args.account,
            job_name=args.job_name,
            config=args.config,
            overrides=tuple(args.overrides),
            output=output,
            workdir=os.getcwd(),
            bin_dir=str(Path(sys.executable).parent),
            output_dir=output_dir,
        )
    except ValueError as err:
        parser.error(str(err))


def _gpus_per_node(args: argparse.Namespace, cfg, parser: argparse.ArgumentParser) -> int:
    """``--gpus-per-node``, else the config's ``gpus_per_node``, else the partition's GRES when
    unambiguous; never this machine's GPUs (a login node has none). Says on stderr where it came from."""
    if args.gpus_per_node is not None:
        return args.gpus_per_node
    if cfg.gpus_per_node is not None:
        print(f"packlora slurm: {cfg.gpus_per_node} GPU(s) per node from gpus_per_node in {args.config}",
              file=sys.stderr)
        return cfg.gpus_per_node
    found, why = sinfo.query(args.partition)
    if found is None:
        parser.error(
            f"--gpus-per-node is required: the GPUs of this machine say nothing about the compute nodes, and "
            f"{why}. Pass --gpus-per-node G (GPUs per node; 0 for CPU processes with gloo), or set "
            f"gpus_per_node: G in {args.config}"
        )
    where = f"partition {args.partition!r}" if args.partition else "the default partition"
    print(f"packlora slurm: {found} GPU(s) per node, the GRES of every node in {where} (sinfo)", file=sys.stderr)
    return found


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="packlora slurm",
        description="Write an sbatch script that trains CONFIG on --nodes machines; print or submit it.",
    )
    p.add_argument("config", help="training YAML config; relative paths are read from the current directory")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, passed on in order")
    p.add_argument("--nodes", type=int, required=True, help="machines to allocate")
    p.add_argument(
        "--gpus-per-node",
        type=int,
        help="GPUs per machine; 0: CPU processes (gloo). Default: the config's gpus_per_node, else the "
        "partition's GRES if every node has the same number of GPUs, else an error (never this machine's GPUs)",
    )
    p.add_argument("--nproc-per-node", type=int, help="CPU processes per machine when --gpus-per-node 0 (default 2)")
    p.add_argument(
        "--cpus-per-gpu",
        "--cpus-per-process",
        type=int,
        help=f"CPU cores per training process, i.e. per GPU; every srun step gets them "
        f"(default: {DEFAULT_CPUS_PER_GPU} per GPU, 1 per CPU process)",
    )
    p.add_argument(
        "--warn-before",
        type=int,
        default=DEFAULT_WARN_BEFORE_S,
        metavar="SECONDS",
        help="Slurm signals the job this long before its time limit (--signal=B:USR1@SECONDS); the run then "
        "saves a checkpoint at the next step and stops (exit 75). Must cover a step plus a checkpoint "
        "save; 0: no signal (default: %(default)s)",
    )
    p.add_argument(
        "--no-requeue",
        action="store_true",
        help="after that stop, end the job (exit 75) instead of requeueing it; a requeued job resumes "
        "from the newest complete checkpoint",
    )
    p.add_argument(
        "--launcher",
        choices=SLURM_LAUNCHERS,
        default="torchrun",
        help="per-node launcher started by srun, or srun itself one task per process (default: %(default)s)",
    )
    p.add_argument(
        "--master-port",
        type=int,
        help="rendezvous port (default: MASTER_PORT from the environment, else chosen on the first node at start)",
    )
    p.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    p.add_argument("--time", help="time limit, e.g. 04:00:00 (default: the partition's)")
    p.add_argument("--account", help="Slurm account to charge (default: yours)")
    p.add_argument("--job-name", default="packlora", help="default: %(default)s")
    p.add_argument("--output", help="directory for the script and the Slurm log (default: <output_dir>/slurm)")
    p.add_argument("--overwrite", action="store_true",
                   help="when output_dir already holds a run (checkpoints or packlora_config.yaml), delete that run "
                   "before writing the script (only the files packlora writes). Without it such a job is refused")
    p.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command; write nothing")
    p.add_argument("--submit", action="store_true", help="submit the script with sbatch")
    p.add_argument("--wait", action="store_true", help="with --submit: wait for the job, return its exit code")
    add_debug_flag(p)
    return p
