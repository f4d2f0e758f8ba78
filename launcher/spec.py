"""``LaunchSpec``: everything needed to start one training run, written once.

Node and process counts live only here; ``launcher.commands`` turns a spec into the
``deepspeed`` or ``torchrun`` argv, and ``launcher.cli`` builds the spec from flags.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from packlora.core.errors import InputError

LAUNCHERS = ("deepspeed", "torchrun")
"""Programs that start the processes of one node (or, deepspeed with ssh, of every node)."""

_OVERRIDE = re.compile(r"\w+(\.\w+)*=.*", re.DOTALL)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True, kw_only=True)
class LaunchSpec:
    """A validated launch request. Raises ``ValueError`` listing every bad field at once.

    Example:
        >>> spec = LaunchSpec(launcher="torchrun", nnodes=2, nproc_per_node=8,
        ...                   master_addr="10.0.0.1", master_port=29500, config="sft.yaml")
        >>> spec.world_size
        16
    """

    launcher: str
    """``"deepspeed"`` or ``"torchrun"``: the program that starts the processes."""
    nnodes: int = 1
    """Number of machines (``--nnodes``)."""
    nproc_per_node: int
    """Processes per machine, one per GPU, or CPU processes with gloo (``--nproc-per-node``)."""
    node_rank: int = 0
    """Index of this machine in ``[0, nnodes)``; torchrun, or deepspeed with ``no_ssh``."""
    master_addr: str = "127.0.0.1"
    """Address of node 0, reachable from every node (``--master-addr``)."""
    master_port: int
    """TCP port on node 0 for the rendezvous, the same on every node (``--master-port``)."""
    hostfile: str | None = None
    """MPI-style hostfile (``worker-0 slots=8`` per line); deepspeed only, required for ``nnodes > 1``."""
    no_ssh: bool = False
    """deepspeed only: start just this node's processes (``--no_ssh --node_rank``), as when every node
    runs its own launcher (Slurm); otherwise deepspeed starts all hostfile nodes from node 0 over ssh."""
    config: str
    """Path of the training YAML config passed to ``packlora.train``."""
    overrides: tuple[str, ...] = ()
    """Config overrides ``key.sub=value`` appended after the config path, in order."""
    env: tuple[tuple[str, str], ...] = ()
    """``(name, value)`` environment variables set for the launched processes, on top of the caller's."""

    def __post_init__(self) -> None:
        # Accept lists from callers, but store tuples so the spec stays hashable.
        object.__setattr__(self, "overrides", tuple(self.overrides))
        object.__setattr__(self, "env", tuple((name, value) for name, value in self.env))
        problems = self._problems()
        if problems:
            raise InputError("invalid launch settings:\n  - " + "\n  - ".join(problems))

    @property
    def world_size(self) -> int:
        """Total number of training processes: ``nnodes * nproc_per_node``."""
        return self.nnodes * self.nproc_per_node

    def _problems(self) -> list[str]:
        problems = []
        if self.launcher not in LAUNCHERS:
            problems.append(f"--launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if self.nnodes < 1:
            problems.append(f"--nnodes must be >= 1, got {self.nnodes}")
        if self.nproc_per_node < 1:
            problems.append(f"--nproc-per-node must be >= 1, got {self.nproc_per_node}")
        if not 0 <= self.node_rank < max(self.nnodes, 1):
            problems.append(f"--node-rank must be in [0, --nnodes={self.nnodes}), got {self.node_rank}")
        if not 1 <= self.master_port <= 65535:
            problems.append(f"--master-port must be in 1..65535, got {self.master_port}")
        if self.nnodes > 1 and _is_loopback(self.master_addr):
            problems.append(
                f"--master-addr must be node 0's address as seen from the other nodes when --nnodes > 1, "
                f"got {self.master_addr!r}"
            )
        if self.launcher == "torchrun" and self.hostfile is not None:
            problems.append(
                f"--hostfile is only read by --launcher deepspeed, got {self.hostfile!r} with torchrun; "
                "drop it and start torchrun on each node with its --node-rank"
            )
        if self.launcher == "deepspeed" and self.nnodes > 1 and self.hostfile is None:
            problems.append(
                f"--nnodes {self.nnodes} with --launcher deepspeed needs --hostfile (deepspeed starts every node "
                "from node 0 over ssh); or use --launcher torchrun and run it on each node with --node-rank"
            )
        if self.no_ssh and self.launcher != "deepspeed":
            problems.append(f"--no-ssh is only read by --launcher deepspeed, got it with {self.launcher}")
        if self.no_ssh and self.hostfile is None:
            problems.append("--no-ssh needs --hostfile: deepspeed reads every node's slots from it")
        if self.launcher == "deepspeed" and self.node_rank != 0 and not self.no_ssh:
            problems.append(
                f"--node-rank is only used by --launcher torchrun, got {self.node_rank} with deepspeed, "
                "which starts all hostfile nodes from node 0; drop --node-rank, or add --no-ssh and run it on each node"
            )
        problems += config_problems(self.config, self.overrides)
        problems += [
            f"environment variable name {name!r} must match [A-Za-z_][A-Za-z0-9_]*"
            for name, _ in self.env
            if not _ENV_NAME.fullmatch(name)
        ]
        return problems


def _is_loopback(addr: str) -> bool:
    if addr == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:  # a host name: cannot tell without a lookup
        return False


def config_problems(config: str, overrides: tuple[str, ...]) -> list[str]:
    """Problems with a spec's config path and ``key.sub=value`` overrides (shared by every launcher).

    >>> config_problems("run.yaml", ("training.max_steps=5", "oops"))
    ["override 'oops' must have the form key.sub=value (e.g. training.max_steps=5)"]
    """
    problems = [] if config else ["config must be the path of a YAML file, got ''"]
    problems += [
        f"override {o!r} must have the form key.sub=value (e.g. training.max_steps=5)"
        for o in overrides
        if not _OVERRIDE.fullmatch(o)
    ]
    return problems
