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

from packlora.core.errors import InputError
from packlora.launcher.commands import KILLED_BY_SIGKILL, OOM_HINT, TRAIN_MODULE, build_argv
from packlora.launcher.spec import LaunchSpec, config_problems

SLURM_LAUNCHERS = ("torchrun", "deepspeed", "srun")
"""What starts the training processes on each node: a per-node launcher, or srun itself."""

_TIME = re.compile(r"(\d+-)?\d+(:\d+){0,2}")
DEFAULT_CPUS_PER_GPU = 8
"""CPU cores asked per GPU unless ``--cpus-per-gpu`` says otherwise: enough for the process's main
thread, tokenisation and a few data-loading workers, and available on common GPU nodes (8 GPUs and
64 or more cores)."""
DEFAULT_WARN_BEFORE_S = 300
"""Default warning before the time limit: Slurm may send it up to 60 s early, and a step plus a
DeepSpeed checkpoint of a multi-billion-parameter model takes minutes."""


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
    cpus_per_process: int | None = None
    """CPU cores per training process, i.e. per GPU on a GPU job; default ``DEFAULT_CPUS_PER_GPU`` with
    GPUs, 1 on CPU (where each process runs one thread, ``OMP_NUM_THREADS=1``)."""
    warn_before: int = DEFAULT_WARN_BEFORE_S
    """Seconds before the time limit at which Slurm sends USR1 to the batch script
    (``#SBATCH --signal=B:USR1@...``): the run then saves a checkpoint at the next step boundary and
    stops. Must cover one step plus one checkpoint save. 0: no warning."""
    requeue: bool = True
    """Requeue the job after a stop on the warning (``scontrol requeue``) and let Slurm requeue it
    (``#SBATCH --requeue``); a requeued job resumes from the newest complete checkpoint."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", tuple(self.overrides))
        problems = self._problems()
        if problems:
            raise InputError("invalid Slurm settings:\n  - " + "\n  - ".join(problems))

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

    @property
    def cpus_per_proc(self) -> int:
        """CPU cores per training process: ``cpus_per_process``, else 8 per GPU, else 1 (CPU)."""
        if self.cpus_per_process is not None:
            return self.cpus_per_process
        return DEFAULT_CPUS_PER_GPU if self.gpus_per_node else 1

    @property
    def cpus_per_task(self) -> int:
        """``--cpus-per-task`` of each Slurm task: one task per process (srun) or per node (launchers)."""
        return self.cpus_per_proc * (1 if self.launcher == "srun" else self.procs_per_node)

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
        if self.cpus_per_process is not None and self.cpus_per_process < 1:
            problems.append(f"--cpus-per-gpu (--cpus-per-process) must be >= 1, got {self.cpus_per_process}")
        if self.warn_before < 0:
            problems.append(f"--warn-before must be >= 0 seconds (0: no warning), got {self.warn_before}")
        if self.master_port is not None and not 1 <= self.master_port <= 65535:
            problems.append(f"--master-port must be in 1..65535, got {self.master_port}")
        if self.time is not None and not _TIME.fullmatch(self.time):
            problems.append(f"--time must be Slurm time like 30, 04:00:00 or 1-00:00, got {self.time!r}")
        elif self.time is not None and self.warn_before * 2 > slurm_time_seconds(self.time):
            problems.append(
                f"--warn-before {self.warn_before} s would stop the run before half of --time {self.time} "
                f"({slurm_time_seconds(self.time)} s) is used, every time it is requeued; lower --warn-before "
                "or raise --time"
            )
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


def slurm_time_seconds(text: str) -> int:
    """Seconds in a Slurm time limit: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``
    (sbatch(1), ``--time``).

    Example:
        >>> [slurm_time_seconds(t) for t in ("30", "30:15", "04:00:00", "1-00", "1-02:30", "1-00:00:10")]
        [1800, 1815, 14400, 86400, 95400, 86410]
    """
    days, _, rest = text.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:  # D-HH[:MM[:SS]]
        h, m, sec = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + sec
    if len(parts) == 3:
        return (parts[0] * 60 + parts[1]) * 60 + parts[2]
    return parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)


def sbatch_script(spec: SlurmSpec) -> str:
    """The sbatch script for ``spec``: ``#SBATCH`` header, rendezvous, stop and requeue handling, then
    one ``srun`` line, run in the background so that the USR1 trap fires while it runs.

    A run that fails after a process was killed by signal 9 (a launcher or Slurm says so in this
    run's part of the Slurm log, ``launcher.commands.KILLED_BY_SIGKILL``) ends with ``OOM_HINT``.

    A stop (the ``PACKLORA_STOP_FILE`` exists: the USR1 trap made it, or a user) ends the training at
    the next step boundary with a complete checkpoint (``training.preemption``); the script then exits
    ``STOPPED_EXIT_CODE`` and, after USR1 with ``requeue``, requeues the job first. A requeued job
    (``SLURM_RESTART_COUNT`` > 0) passes ``training.resume_from_checkpoint=auto``.

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
        #SBATCH --cpus-per-task=32
        #SBATCH --output=/scratch/o/slurm-%j.out
        #SBATCH --open-mode=append
        #SBATCH --signal=B:USR1@300
        #SBATCH --requeue
        export PACKLORA_STOP_FILE=/scratch/o/stop-"$SLURM_JOB_ID"
        export PACKLORA_WORLD_SIZE=8
        export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
        export MASTER_PORT=29500
        export PACKLORA_RESUME=
    """
    from packlora.training.preemption import STOPPED_EXIT_CODE  # light: no torch at import

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
    lines.append(f"#SBATCH --cpus-per-task={spec.cpus_per_task}")
    optional = (("partition", spec.partition), ("time", spec.time), ("account", spec.account))
    lines += [f"#SBATCH --{flag}={value}" for flag, value in optional if value is not None]
    lines += [
        f"#SBATCH --output={spec.output}/slurm-%j.out",
        "#SBATCH --open-mode=append",  # a requeued run adds to the log instead of truncating it
    ]
    if spec.warn_before:
        lines.append(f"#SBATCH --signal=B:USR1@{spec.warn_before}")
    lines += [
        "#SBATCH --requeue" if spec.requeue else "#SBATCH --no-requeue",
        "set -euo pipefail",
        f"cd {shlex.quote(spec.workdir)}",
    ]
    if spec.bin_dir is not None:
        lines.append(f'export PATH={shlex.quote(spec.bin_dir)}:"$PATH"')
    lines += [
        f"# Once this file exists the training saves a complete checkpoint at the next step boundary and "
        f"exits {STOPPED_EXIT_CODE}.",
        f'export PACKLORA_STOP_FILE={shlex.quote(spec.output)}/stop-"$SLURM_JOB_ID"',
        'rm -f "$PACKLORA_STOP_FILE" "$PACKLORA_STOP_FILE".checkpoint  # left by the run before a requeue',
    ]
    if spec.warn_before:
        then = "then requeue" if spec.requeue else f"then exit {STOPPED_EXIT_CODE}"
        lines += [
            "warned=0",
            f"trap 'warned=1; echo \"packlora: job $SLURM_JOB_ID got USR1 (time limit or pre-emption in "
            f"{spec.warn_before} s): checkpoint at the next step boundary, {then}\"; "
            "touch \"$PACKLORA_STOP_FILE\"' USR1",
        ]
    if not spec.gpus_per_node:
        lines.append("export OMP_NUM_THREADS=1")
    lines += [
        f"export PACKLORA_WORLD_SIZE={spec.world_size}",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        # The batch script runs on the first node of the allocation, i.e. on MASTER_ADDR: bind-test here.
        f"export MASTER_PORT={spec.master_port}" if spec.master_port is not None
        else 'export MASTER_PORT="$(python -m packlora.launcher.ports --seed "$SLURM_JOB_ID")"',
        f'echo "packlora: job $SLURM_JOB_ID, {n} node(s) x {g} process(es), rendezvous $MASTER_ADDR:$MASTER_PORT"',
    ]
    if spec.requeue:
        lines += [
            "# A requeued job (SLURM_RESTART_COUNT > 0) resumes from the newest complete checkpoint in output_dir.",
            "export PACKLORA_RESUME=",
            f'if [ "${{SLURM_RESTART_COUNT:-0}}" != 0 ]; then PACKLORA_RESUME={RESUME_OVERRIDE}; fi',
        ]
    lines.append(_echo_paths(spec, "started;"))
    if spec.launcher == "deepspeed":
        lines.append(
            f"python -m packlora.launcher.hostfile --slots {g} "
            f'$(scontrol show hostnames "$SLURM_JOB_NODELIST") > {shlex.quote(spec.output)}/hostfile-"$SLURM_JOB_ID"'
        )
    log = f'{shlex.quote(spec.output)}/slurm-"$SLURM_JOB_ID".out'
    lines += [
        f'log_start="$(stat -c %s {log} 2>/dev/null || echo 0)"  # this run\'s part of the log starts here',
        srun_line(spec) + " &",
        "srun_pid=$!",
        "while :; do  # a trapped signal interrupts wait while srun still runs: wait again",
        '  wait "$srun_pid" && status=0 || status=$?',
        '  kill -0 "$srun_pid" 2>/dev/null || break',
        "done",
        'if [ -e "$PACKLORA_STOP_FILE".checkpoint ]; then  # the training stopped on request, checkpoint complete',
        f"  status={STOPPED_EXIT_CODE}",
        '  echo "packlora: job $SLURM_JOB_ID stopped cleanly: $(cat "$PACKLORA_STOP_FILE".checkpoint)"',
    ]
    if spec.warn_before and spec.requeue:
        lines += [
            '  if [ "$warned" = 1 ]; then',
            '    echo "packlora: requeueing job $SLURM_JOB_ID; the next run resumes from that checkpoint"',
            '    scontrol requeue "$SLURM_JOB_ID"',
            "  fi",
        ]
    lines += [
        "fi",
        f'if [ "$status" != 0 ] && grep -qE {shlex.quote(KILLED_BY_SIGKILL)} <(tail -c +"$((log_start + 1))" {log} 2>/dev/null); then',
        f'  echo "packlora: job $SLURM_JOB_ID: a training process was {OOM_HINT}"',
        "fi",
        _echo_paths(spec, "finished with exit code $status;"),
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


RESUME_OVERRIDE = "training.resume_from_checkpoint=auto"
"""What a requeued job adds to the training command (``$PACKLORA_RESUME`` in the script)."""


def srun_line(spec: SlurmSpec) -> str:
    """The ``srun`` line that starts the training: one launcher per node, or one task per process.

    Every step gets its CPUs on the line itself (``--cpus-per-task``): from Slurm 22.05 on, srun no
    longer inherits the batch job's ``--cpus-per-task``. With ``requeue``, the unquoted
    ``$PACKLORA_RESUME`` at the end is empty on the first run and ``RESUME_OVERRIDE`` after a requeue.

    Example:
        >>> print(srun_line(SlurmSpec(nodes=1, gpus_per_node=0, launcher="srun", config="c.yaml",
        ...                           output="/o", workdir="/w", overrides=("training.max_steps=5",))))
        srun --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --kill-on-bad-exit=1 python -m packlora.train c.yaml training.max_steps=5 $PACKLORA_RESUME
    """
    n, g = spec.nodes, spec.procs_per_node
    resume = " $PACKLORA_RESUME" if spec.requeue else ""
    if spec.launcher == "srun":
        return shlex.join(
            ["srun", f"--nodes={n}", f"--ntasks-per-node={g}", f"--cpus-per-task={spec.cpus_per_task}",
             "--kill-on-bad-exit=1", "python", "-m", TRAIN_MODULE, spec.config, *spec.overrides]
        ) + resume  # fmt: skip
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
    inner = "exec " + " ".join(words) + resume
    if spec.launcher == "deepspeed" and spec.gpus_per_node:
        # deepspeed sets CUDA_VISIBLE_DEVICES=0..G-1 itself, i.e. it would remap the GPUs Slurm assigned.
        expected = ",".join(str(i) for i in range(g))
        inner = (
            f'case "${{CUDA_VISIBLE_DEVICES:-{expected}}}" in {expected}) ;; *) echo "packlora: deepspeed would '
            "remap the GPUs Slurm assigned (CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES); "
            'use --launcher torchrun" >&2; '
            f"exit 2;; esac; {inner}"
        )
    return shlex.join(
        ["srun", f"--nodes={n}", "--ntasks-per-node=1", f"--cpus-per-task={spec.cpus_per_task}",
         "--kill-on-bad-exit=1", "bash", "-c"]
    ) + (" " + shlex.quote(inner))  # fmt: skip


def _echo_paths(spec: SlurmSpec, when: str) -> str:
    """``echo`` of the checkpoint, TensorBoard and Slurm log paths; paths quoted for the shell."""
    words = [f'"packlora: job $SLURM_JOB_ID {when}"']
    if spec.output_dir is not None:
        words += ['"checkpoints in"', shlex.quote(spec.output_dir),
                  '"TensorBoard logs in"', shlex.quote(spec.output_dir.rstrip("/") + "/runs")]  # fmt: skip
    words += ['"Slurm log"', shlex.quote(spec.output) + '/slurm-"$SLURM_JOB_ID".out']
    return "echo " + " ".join(words)
