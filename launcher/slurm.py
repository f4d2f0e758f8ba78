"""Pure: a ``SlurmSpec`` -> the text of an sbatch script. ``launcher.slurm_cli`` writes and submits it.

Layout (the default, ``launcher="torchrun"``): one launcher task per node through ``srun``; each runs
torchrun (or deepspeed with ``--no_ssh``) for that node's processes. The rendezvous is the first host
of ``scontrol show hostnames "$SLURM_JOB_NODELIST"``, which is also the node the batch script runs on,
so the port is chosen and bind-tested there, outside the kernel's ephemeral range
(``launcher.ports``), unless an explicit port is given. torchrun leaves the ``CUDA_VISIBLE_DEVICES``
Slurm set alone; deepspeed would renumber it, so the deepspeed line refuses any value other than
``0,...,G-1``. With ``launcher="srun"``, srun starts every training process itself (one task per
process) and ``training.distributed`` maps ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_STEP_NUM_TASKS``.

Every count (nodes, processes per node) is written once, in the spec; the ``#SBATCH`` header,
the launcher line and ``PACKLORA_WORLD_SIZE`` (checked by each training process) derive from it.
"""
from __future__ import annotations

import re
import shlex
from dataclasses import dataclass

from launcher.commands import TRAIN_MODULE, build_argv
from launcher.spec import LaunchSpec, config_problems

SLURM_LAUNCHERS = ("torchrun", "deepspeed", "srun")
"""What starts the training processes on each node: a per-node launcher, or srun itself."""

_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}")


@dataclass(frozen=True, slots=True, kw_only=True)
class SlurmSpec:
    """One Slurm batch job. Raises ``ValueError`` listing every bad field at once.

    Example:
        >>> SlurmSpec(nodes=2, gpus_per_node=8, config="sft.yaml", output="/scratch/run",
        ...           workdir="/home/me/packlora").world_size
        16
    """

    nodes: int
    """Machines to allocate (``#SBATCH --nodes``)."""
    gpus_per_node: int
    """GPUs to allocate per machine (``#SBATCH --gpus-per-node``); 0 for CPU processes with gloo."""
    nproc_per_node: int | None = None
    """Training processes per machine; default ``gpus_per_node``, or 2 on CPU."""
    launcher: str = "torchrun"
    """``torchrun`` or ``deepspeed`` (one launcher task per node), or ``srun`` (one task per process)."""
    master_port: int | None = None
    """Rendezvous port; ``None``: chosen when the job starts, outside the ephemeral range."""
    partition: str | None = None
    """``#SBATCH --partition``; the cluster default when ``None``."""
    time: str | None = None
    """``#SBATCH --time`` as Slurm reads it (``MM``, ``HH:MM:SS``, ``D-HH:MM``); the partition's default
    when ``None``."""
    account: str | None = None
    """``#SBATCH --account``; the user's default when ``None``."""
    job_name: str = "packlora"
    """``#SBATCH --job-name``."""
    config: str
    """Training YAML config, relative to ``workdir`` or absolute."""
    overrides: tuple[str, ...] = ()
    """Config overrides ``key.sub=value``, in order."""
    output: str
    """Absolute directory for the script, the hostfile and the Slurm log ``slurm-<jobid>.out``."""
    workdir: str
    """Absolute directory the job runs in (the repository root: relative config paths start here)."""
    bin_dir: str | None = None
    """Directory put first on ``PATH`` (the virtual environment's ``bin``); ``None`` leaves PATH alone."""
    output_dir: str | None = None
    """The config's ``output_dir`` (checkpoints, ``runs/`` TensorBoard logs), echoed at start and end."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", tuple(self.overrides))
        problems = self._problems()
        if problems:
            raise ValueError("invalid Slurm settings:\n  - " + "\n  - ".join(problems))

    @property
    def procs_per_node(self) -> int:
        """Training processes per node: ``nproc_per_node``, else ``gpus_per_node``, else 2 (CPU)."""
        if self.nproc_per_node is not None:
            return self.nproc_per_node
        return self.gpus_per_node or 2

    @property
    def world_size(self) -> int:
        """Training processes in the job: ``nodes * procs_per_node``."""
        return self.nodes * self.procs_per_node

    def _problems(self) -> list[str]:
        problems = []
        if self.nodes < 1:
            problems.append(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 0:
            problems.append(f"--gpus-per-node must be >= 0 (0: CPU processes), got {self.gpus_per_node}")
        if self.nproc_per_node is not None and self.nproc_per_node < 1:
            problems.append(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if self.gpus_per_node and self.nproc_per_node not in (None, self.gpus_per_node):
            problems.append(
                f"--nproc-per-node {self.nproc_per_node} with --gpus-per-node {self.gpus_per_node}: "
                "start one process per GPU (drop --nproc-per-node)"
            )
        if self.launcher not in SLURM_LAUNCHERS:
            problems.append(f"--launcher must be one of {', '.join(SLURM_LAUNCHERS)}, got {self.launcher!r}")
        if self.master_port is not None and not 1 <= self.master_port <= 65535:
            problems.append(f"--master-port must be in 1..65535, got {self.master_port}")
        if self.time is not None and not _TIME.fullmatch(self.time):
            problems.append(f"--time must be Slurm time like 30, 04:00:00 or 1-00:00, got {self.time!r}")
        for name in ("output", "workdir"):
            if not getattr(self, name).startswith("/"):
                problems.append(
                    f"{name} must be an absolute path (the job may start elsewhere), got {getattr(self, name)!r}"
                )
        for name in ("partition", "account", "job_name"):
            value = getattr(self, name)
            if value is not None and (not value or any(c.isspace() for c in value)):
                problems.append(f"--{name.replace('_', '-')} must be one word, got {value!r}")
        problems += config_problems(self.config, self.overrides)
        return problems


def sbatch_script(spec: SlurmSpec) -> str:
    """The sbatch script for ``spec``: ``#SBATCH`` header, rendezvous, then one ``srun`` line.

    Returns:
        bash text, newline-terminated; golden-tested in ``tests/launcher/test_slurm.py``.

    Example:
        >>> text = sbatch_script(SlurmSpec(nodes=2, gpus_per_node=4, config="sft.yaml",
        ...                                output="/scratch/o", workdir="/w", master_port=29500))
        >>> print("\\n".join(l for l in text.splitlines() if l.startswith(("#SBATCH", "export"))))
        #SBATCH --job-name=packlora
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=1
        #SBATCH --gpus-per-node=4
        #SBATCH --output=/scratch/o/slurm-%j.out
        export PACKLORA_WORLD_SIZE=8
        export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
        export MASTER_PORT=29500
    """
    n, g = spec.nodes, spec.procs_per_node
    per_process = spec.launcher == "srun"
    lines = [
        "#!/bin/bash",
        f"# Written by `packlora slurm`: {n} node(s) x {g} process(es) = {spec.world_size} training processes, "
        + ("one srun task per process." if per_process else f"one {spec.launcher} task per node."),
        f"#SBATCH --job-name={spec.job_name}",
        f"#SBATCH --nodes={n}",
        f"#SBATCH --ntasks-per-node={g if per_process else 1}",
    ]
    if spec.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
    else:  # CPU: one core per training process
        lines.append(f"#SBATCH --cpus-per-task={1 if per_process else g}")
    optional = (("partition", spec.partition), ("time", spec.time), ("account", spec.account))
    lines += [f"#SBATCH --{flag}={value}" for flag, value in optional if value is not None]
    lines += [
        f"#SBATCH --output={spec.output}/slurm-%j.out",
        "set -euo pipefail",
        f"cd {shlex.quote(spec.workdir)}",
    ]
    if spec.bin_dir is not None:
        lines.append(f'export PATH={shlex.quote(spec.bin_dir)}:"$PATH"')
    if not spec.gpus_per_node:
        lines.append("export OMP_NUM_THREADS=1")
    lines += [
        f"export PACKLORA_WORLD_SIZE={spec.world_size}",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        # The batch script runs on the first node of the allocation, i.e. on MASTER_ADDR: bind-test here.
        f"export MASTER_PORT={spec.master_port}" if spec.master_port is not None
        else 'export MASTER_PORT="$(python -m launcher.ports --seed "$SLURM_JOB_ID")"',
        f'echo "packlora: job $SLURM_JOB_ID, {n} node(s) x {g} process(es), rendezvous $MASTER_ADDR:$MASTER_PORT"',
    ]
    lines.append(_echo_paths(spec, "started;"))
    if spec.launcher == "deepspeed":
        lines.append(
            f"python -m launcher.hostfile --slots {g} "
            f'$(scontrol show hostnames "$SLURM_JOB_NODELIST") > {shlex.quote(spec.output)}/hostfile-"$SLURM_JOB_ID"'
        )
    lines += [
        srun_line(spec) + " && status=0 || status=$?",
        _echo_paths(spec, "finished with exit code $status;"),
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def srun_line(spec: SlurmSpec) -> str:
    """The ``srun`` line that starts the training: one launcher per node, or one task per process.

    Example:
        >>> print(srun_line(SlurmSpec(nodes=1, gpus_per_node=0, launcher="srun", config="c.yaml",
        ...                           output="/o", workdir="/w", overrides=("training.max_steps=5",))))
        srun --nodes=1 --ntasks-per-node=2 --kill-on-bad-exit=1 python -m training.train c.yaml training.max_steps=5
    """
    n, g = spec.nodes, spec.procs_per_node
    if spec.launcher == "srun":
        return shlex.join(
            ["srun", f"--nodes={n}", f"--ntasks-per-node={g}", "--kill-on-bad-exit=1",
             "python", "-m", TRAIN_MODULE, spec.config, *spec.overrides]
        )  # fmt: skip
    runtime = {"--node-rank": '"$SLURM_NODEID"', "--node_rank": '"$SLURM_NODEID"',
               "--master-addr": '"$MASTER_ADDR"', "--master_addr": '"$MASTER_ADDR"',
               "--master-port": '"$MASTER_PORT"', "--master_port": '"$MASTER_PORT"',
               "--hostfile": f'{shlex.quote(spec.output)}/hostfile-"$SLURM_JOB_ID"'}  # fmt: skip
    launch = LaunchSpec(
        launcher=spec.launcher, nnodes=n, nproc_per_node=g, master_addr="MASTER_ADDR", master_port=1,
        hostfile="HOSTFILE" if spec.launcher == "deepspeed" else None, no_ssh=spec.launcher == "deepspeed",
        config=spec.config, overrides=spec.overrides,
    )  # placeholders, replaced by the shell variables the job sets
    argv = build_argv(launch)
    words = [runtime[argv[i - 1]] if i and argv[i - 1] in runtime else shlex.quote(w) for i, w in enumerate(argv)]
    inner = "exec " + " ".join(words)
    if spec.launcher == "deepspeed" and spec.gpus_per_node:
        # deepspeed sets CUDA_VISIBLE_DEVICES=0..G-1 itself, i.e. it would remap the GPUs Slurm assigned.
        expected = ",".join(str(i) for i in range(g))
        inner = (
            f'case "${{CUDA_VISIBLE_DEVICES:-{expected}}}" in {expected}) ;; *) echo "packlora: deepspeed would '
            "remap the GPUs Slurm assigned (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES); "
            'use --launcher torchrun" >&2; '
            f"exit 2;; esac; {inner}"
        )
    return shlex.join(["srun", f"--nodes={n}", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "bash", "-c"]) + (
        " " + shlex.quote(inner)
    )


def _echo_paths(spec: SlurmSpec, when: str) -> str:
    """``echo`` of the checkpoint, TensorBoard and Slurm log paths; paths quoted for the shell."""
    words = [f'"packlora: job $SLURM_JOB_ID {when}"']
    if spec.output_dir is not None:
        words += ['"checkpoints in"', shlex.quote(spec.output_dir),
                  '"TensorBoard logs in"', shlex.quote(spec.output_dir.rstrip("/") + "/runs")]  # fmt: skip
    words += ['"Slurm log"', shlex.quote(spec.output) + '/slurm-"$SLURM_JOB_ID".out']
    return "echo " + " ".join(words)
