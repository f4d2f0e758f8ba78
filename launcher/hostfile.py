"""DeepSpeed hostfiles: one ``host slots=N`` line per machine, written and read here.

    worker-0 slots=8
    # a comment; blank lines are skipped too
    worker-1 slots=8   # trailing comments as well

Command line (used by the sbatch script to write the hostfile of its allocation)::

    $ python -m packlora.launcher.hostfile --slots 8 node01 node02
    node01 slots=8
    node02 slots=8
"""
from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from packlora.core.errors import InputError

_LINE = re.compile(r"(?P<host>\S+)\s+slots=(?P<slots>\S*)")


class HostfileError(InputError):
    """A hostfile line that cannot be used; the message quotes it with its line number."""


@dataclass(frozen=True, slots=True)
class Host:
    """One machine of a hostfile."""

    name: str
    """Host name or address, as ssh (deepspeed) or ``scontrol show hostnames`` (Slurm) spells it."""
    slots: int
    """Processes (GPUs) to start on it, >= 1."""


def format_hostfile(hosts: Iterable[Host]) -> str:
    """Hostfile text for ``hosts``, one ``name slots=N`` line each, newline-terminated.

    Example:
        >>> format_hostfile([Host("node01", 8), Host("node02", 8)])
        'node01 slots=8\\nnode02 slots=8\\n'
    """
    return "".join(f"{h.name} slots={h.slots}\n" for h in hosts)


def parse_hostfile(text: str, source: str = "hostfile") -> tuple[Host, ...]:
    """The hosts of a hostfile, in file order. Blank lines and ``#`` comments are skipped.

    Raises:
        HostfileError: a line is not ``host slots=N`` with an integer N >= 1, a host appears
            twice, or there is no host at all. The message is ``source:LINE: 'the line'`` and why.

    Example:
        >>> parse_hostfile("\\n# two nodes\\nnode01 slots=8\\nnode02 slots=4  # older box\\n")
        (Host(name='node01', slots=8), Host(name='node02', slots=4))
    """
    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{number}: {raw.strip()!r}"
        match = _LINE.fullmatch(line)
        if match is None:
            raise HostfileError(f"{where} is not 'HOST slots=N' (e.g. 'worker-0 slots=8')")
        name, slots = match["host"], match["slots"]
        if not slots.isdigit() or int(slots) < 1:
            raise HostfileError(f"{where}: slots must be a whole number >= 1, got {slots!r}")
        if name in seen:
            raise HostfileError(f"{where}: host {name!r} is already listed on line {seen[name]}; list each host once")
        seen[name] = number
        hosts.append(Host(name, int(slots)))
    if not hosts:
        raise HostfileError(f"{source}: no 'HOST slots=N' line (only blank lines or comments)")
    return tuple(hosts)


def read_hostfile(path: str) -> tuple[Host, ...]:
    """``parse_hostfile`` of the file at ``path``; errors name the path.

    Raises:
        HostfileError: as ``parse_hostfile``, or the file does not exist.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise HostfileError(f"hostfile not found: {path!r}") from None
    return parse_hostfile(text, source=path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m packlora.launcher.hostfile", description="print a DeepSpeed hostfile")
    p.add_argument("--slots", type=int, required=True, help="processes per host")
    p.add_argument("hosts", nargs="+", help="host names, in rank order")
    args = p.parse_args(argv)
    if args.slots < 1:
        p.error(f"--slots must be >= 1, got {args.slots}")
    sys.stdout.write(format_hostfile(Host(h, args.slots) for h in args.hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
