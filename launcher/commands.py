"""Pure functions from a ``LaunchSpec`` to the launcher's argv, and from argv to a shell line.

Nothing here reads the environment or the file system; ``launcher.cli`` does that.
Every launched process runs ``python -m packlora.train CONFIG [key.sub=value ...]`` and
reads RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from its environment.
"""
from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence

from packlora.launcher.spec import LaunchSpec

TRAIN_MODULE = "packlora.train"
"""The module each launched process runs, as with ``python -m``."""

KILLED_BY_SIGKILL = (
    r"exits with return code = -9|exitcode *: *-9|Signal 9 \(SIGKILL\)|task [0-9]+: Killed|oom[-_ ]kill|OOM Killed"
)
"""How the launchers report a process killed by signal 9, as an extended regular expression that both
Python's ``re`` and ``grep -E`` read: deepspeed's ``launch.py`` (``... exits with return code = -9``),
torchrun (``exitcode  : -9`` and ``Signal 9 (SIGKILL) received by PID ...``), srun (``task 1: Killed``)
and Slurm's cgroup OOM reports (``oom_kill event``, ``OOM Killed``).

>>> import re
>>> bool(re.search(KILLED_BY_SIGKILL, "[launch.py:259:sigkill_handler] ['python', ...] exits with return code = -9"))
True
"""
OOM_HINT = ("killed by signal 9 (likely out of memory): lower training.per_device_train_batch_size or "
            "data.max_seq_length")
"""What ``packlora launch`` and the sbatch script say after a rank was killed by signal 9; the
out-of-memory killer is its usual sender. Memory per rank is estimated in the start-up log
(``training/memory.py``)."""


def deepspeed_argv(spec: LaunchSpec) -> list[str]:
    """The ``deepspeed`` command line for ``spec``.

    ``--num_accelerators`` (alias of ``--num_gpus``) is always passed: without it the
    deepspeed CLI starts a single process on a machine without GPUs. ``--no_local_rank``
    stops it appending ``--local_rank=N`` to our module's arguments (the rank is in the
    environment), and ``--module`` runs ``packlora.train`` as ``python -m`` would.

    Returns:
        argv, starting with ``"deepspeed"``; ``--hostfile`` only when ``spec.hostfile`` is set,
        ``--no_ssh --node_rank R`` only when ``spec.no_ssh`` is.

    Raises:
        ValueError: if ``spec.launcher`` is not ``"deepspeed"``.

    Example:
        >>> spec = LaunchSpec(launcher="deepspeed", nproc_per_node=2, master_port=29500,
        ...                   config="configs/sft.yaml", overrides=("training.max_steps=5",))
        >>> deepspeed_argv(spec)  # doctest: +NORMALIZE_WHITESPACE
        ['deepspeed', '--num_nodes', '1', '--num_accelerators', '2',
         '--master_addr', '127.0.0.1', '--master_port', '29500',
         '--no_local_rank', '--module', 'packlora.train', 'configs/sft.yaml', 'training.max_steps=5']
    """
    _check_launcher(spec, "deepspeed")
    argv = [
        "deepspeed",
        "--num_nodes", str(spec.nnodes),
        "--num_accelerators", str(spec.nproc_per_node),
        "--master_addr", spec.master_addr,
        "--master_port", str(spec.master_port),
    ]  # fmt: skip
    if spec.hostfile is not None:
        argv += ["--hostfile", spec.hostfile]
    if spec.no_ssh:
        argv += ["--no_ssh", "--node_rank", str(spec.node_rank)]
    return argv + ["--no_local_rank", "--module", TRAIN_MODULE, spec.config, *spec.overrides]


def torchrun_argv(spec: LaunchSpec) -> list[str]:
    """The ``torchrun`` command line for ``spec`` (static rendezvous on ``master_addr:master_port``).

    For several nodes, run the same command on each node with its own ``--node-rank``.

    Returns:
        argv, starting with ``"torchrun"``.

    Raises:
        ValueError: if ``spec.launcher`` is not ``"torchrun"``.

    Example:
        >>> spec = LaunchSpec(launcher="torchrun", nproc_per_node=2, master_port=29500,
        ...                   config="configs/sft.yaml")
        >>> torchrun_argv(spec)  # doctest: +NORMALIZE_WHITESPACE
        ['torchrun', '--nnodes', '1', '--nproc-per-node', '2', '--node-rank', '0',
         '--master-addr', '127.0.0.1', '--master-port', '29500', '-m', 'packlora.train', 'configs/sft.yaml']
    """
    _check_launcher(spec, "torchrun")
    return [
        "torchrun",
        "--nnodes", str(spec.nnodes),
        "--nproc-per-node", str(spec.nproc_per_node),
        "--node-rank", str(spec.node_rank),
        "--master-addr", spec.master_addr,
        "--master-port", str(spec.master_port),
        "-m", TRAIN_MODULE, spec.config, *spec.overrides,
    ]  # fmt: skip


def build_argv(spec: LaunchSpec) -> list[str]:
    """``deepspeed_argv(spec)`` or ``torchrun_argv(spec)``, whichever ``spec.launcher`` names.

    Example:
        >>> build_argv(LaunchSpec(launcher="torchrun", nproc_per_node=1, master_port=1, config="c.yaml"))[0]
        'torchrun'
    """
    return _BUILDERS[spec.launcher](spec)


def format_command(argv: Sequence[str], env: Iterable[tuple[str, str]] = ()) -> str:
    """One shell line that runs ``argv`` with ``env`` set, every word quoted with ``shlex.quote``.

    Returns:
        ``NAME=value ... argv...``, which a POSIX shell runs as the launcher would.

    Example:
        >>> format_command(["torchrun", "-m", "packlora.train", "my config.yaml"], [("OMP_NUM_THREADS", "1")])
        "OMP_NUM_THREADS=1 torchrun -m packlora.train 'my config.yaml'"
    """
    assignments = [f"{name}={shlex.quote(value)}" for name, value in env]
    return " ".join([*assignments, shlex.join(argv)])


def _check_launcher(spec: LaunchSpec, expected: str) -> None:
    if spec.launcher != expected:
        raise ValueError(f"spec is for launcher {spec.launcher!r}, not {expected!r}; use build_argv(spec)")


_BUILDERS = {"deepspeed": deepspeed_argv, "torchrun": torchrun_argv}
