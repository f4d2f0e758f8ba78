"""Rendezvous ports outside the kernel's ephemeral range, bind-tested.

Why: a port inside ``/proc/sys/net/ipv4/ip_local_port_range`` can be handed out by the kernel
to any outgoing connection at any moment (that is what the range is for), so a ``MASTER_PORT``
picked there, e.g. derived from a Slurm job id, sometimes clashes. Binding port 0 is no better:
the kernel answers from that very range.

The pure parts (``parse_port_range``, ``port_pool``, ``pick_port``) take text and numbers; the
impure ones (``read_ephemeral_range``, ``port_is_free``, ``choose_port``) read ``/proc`` and bind.

Command line (used by the sbatch script on the rendezvous node)::

    $ python -m packlora.launcher.ports --seed "$SLURM_JOB_ID"
    20417
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Callable, Mapping

from packlora.core.errors import InputError

EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
LINUX_DEFAULT_EPHEMERAL = (32768, 60999)
"""Linux's default ``ip_local_port_range``, assumed when the file cannot be read."""
MIN_PORT = 20000
"""Lowest port handed out: well below it live registered services (ssh, databases, ...)."""
MAX_PORT = 65535


def parse_port_range(text: str, source: str = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """``"32768\\t60999\\n"`` -> ``(32768, 60999)``: the two numbers of ``ip_local_port_range``.

    Raises:
        ValueError: the text is not two integers ``low <= high`` in 1..65535; names ``source``.

    Example:
        >>> parse_port_range("32768\\t60999\\n")
        (32768, 60999)
    """
    words = text.split()
    try:
        low, high = (int(w) for w in words)
    except ValueError:
        raise InputError(f"{source}: expected two port numbers 'LOW HIGH', got {text!r}") from None
    if not 1 <= low <= high <= MAX_PORT:
        raise InputError(f"{source}: expected 1 <= LOW <= HIGH <= {MAX_PORT}, got {text!r}")
    return low, high


def port_pool(ephemeral: tuple[int, int], low: int = MIN_PORT, high: int = MAX_PORT) -> list[range]:
    """The ports in ``[low, high]`` that lie outside the ``ephemeral`` range, as up to two ranges.

    Example:
        >>> port_pool((32768, 60999))
        [range(20000, 32768), range(61000, 65536)]
        >>> port_pool((1024, 65535))
        []
    """
    e_low, e_high = ephemeral
    pool = [range(low, min(high, e_low - 1) + 1), range(max(low, e_high + 1), high + 1)]
    return [r for r in pool if len(r)]


def pick_port(
    ephemeral: tuple[int, int], seed: int, is_free: Callable[[int], bool], *, attempts: int = 64
) -> int:
    """The first port that ``is_free`` accepts, trying ports outside ``ephemeral`` in order,
    starting at position ``seed % pool size`` and wrapping around.

    The same ``seed`` (a Slurm job id) gives the same first candidate; different seeds spread
    concurrent jobs on one node over the pool.

    Raises:
        ValueError: ``ephemeral`` leaves no port in ``[MIN_PORT, 65535]``, or none of
            ``attempts`` candidates is free; the message says to pass an explicit port.

    Example (Linux default range: the pool is 20000..32767 then 61000..65535, 17304 ports):
        >>> pick_port((32768, 60999), seed=0, is_free=lambda p: True)
        20000
        >>> pick_port((32768, 60999), seed=12768, is_free=lambda p: True)
        61000
        >>> pick_port((32768, 60999), seed=17303, is_free=lambda p: p != 65535)
        20000
    """
    pool = port_pool(ephemeral)
    size = sum(len(r) for r in pool)
    if size == 0:
        raise InputError(
            f"the ephemeral port range {ephemeral[0]}-{ephemeral[1]} covers every port from {MIN_PORT} to "
            f"{MAX_PORT}; pass --master-port explicitly"
        )
    start = seed % size
    for i in range(min(attempts, size)):
        port = _nth(pool, (start + i) % size)
        if is_free(port):
            return port
    raise InputError(
        f"none of {min(attempts, size)} ports from {_nth(pool, start)} on (outside the ephemeral range "
        f"{ephemeral[0]}-{ephemeral[1]}) could be bound; pass --master-port explicitly"
    )


def _nth(pool: list[range], index: int) -> int:
    for r in pool:
        if index < len(r):
            return r[index]
        index -= len(r)
    raise IndexError(index)


def read_ephemeral_range(path: str = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """This machine's ephemeral port range; Linux's default when ``path`` does not exist (macOS)."""
    try:
        with open(path, encoding="ascii") as f:
            return parse_port_range(f.read(), source=path)
    except FileNotFoundError:
        return LINUX_DEFAULT_EPHEMERAL


def port_is_free(port: int, addr: str = "") -> bool:
    """Whether a TCP socket can bind ``addr:port`` now (``""``: all interfaces), as the
    rendezvous store will (without ``SO_REUSEADDR``, so a port in TIME_WAIT counts as taken)."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(addr or "0.0.0.0", port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.bind(sockaddr)
        return True
    except OSError:
        return False


def choose_port(
    explicit: int | None = None, *, seed: int | None = None, addr: str = "", ephemeral: tuple[int, int] | None = None
) -> int:
    """``explicit`` when given (honoured as is, even inside the ephemeral range: the user knows
    their cluster); otherwise a bind-tested port outside this machine's ephemeral range.

    ``seed`` defaults to this process id, so two launches at once start at different ports;
    ``ephemeral`` to this machine's range (``read_ephemeral_range``).

    Raises:
        ValueError: no port outside the ephemeral range could be bound (see ``pick_port``).
    """
    if explicit is not None:
        return explicit
    ephemeral = read_ephemeral_range() if ephemeral is None else ephemeral
    return pick_port(ephemeral, os.getpid() if seed is None else seed, lambda p: port_is_free(p, addr))


PORT_ENV = "MASTER_PORT"


def explicit_port(flag: int | None, env: Mapping[str, str]) -> tuple[int | None, str]:
    """The rendezvous port the user chose: ``--master-port``, else ``MASTER_PORT`` from the
    environment (torchrun's and deepspeed's own variable, e.g. exported by a site's job prolog);
    ``None`` when neither is set. Also a note for stderr when the environment decided or was overridden.

    Raises:
        ValueError: ``MASTER_PORT`` is set (and no flag) but is not a port number; the message says
            to unset it or pass ``--master-port``.

    Example:
        >>> explicit_port(None, {"MASTER_PORT": "29500"})
        (29500, 'using MASTER_PORT=29500 from the environment as the rendezvous port')
        >>> explicit_port(29511, {"MASTER_PORT": "29500"})
        (29511, '--master-port 29511 overrides MASTER_PORT=29500 from the environment')
        >>> explicit_port(None, {})
        (None, '')
    """
    value = env.get(PORT_ENV, "").strip()
    if flag is not None:
        overridden = value and value != str(flag)
        return flag, f"--master-port {flag} overrides {PORT_ENV}={value} from the environment" if overridden else ""
    if not value:
        return None, ""
    if not value.isdigit() or not 1 <= int(value) <= MAX_PORT:
        raise InputError(
            f"{PORT_ENV}={value!r} in the environment is not a port number (1..{MAX_PORT}); "
            "unset it, or pass --master-port"
        )
    return int(value), f"using {PORT_ENV}={value} from the environment as the rendezvous port"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m packlora.launcher.ports", description=__doc__.splitlines()[0])
    p.add_argument("--seed", type=int, help="start position in the pool, e.g. $SLURM_JOB_ID (default: the pid)")
    p.add_argument("--addr", default="", help="address to bind-test (default: all interfaces)")
    args = p.parse_args(argv)
    try:
        print(choose_port(seed=args.seed, addr=args.addr))
    except ValueError as err:
        print(f"launcher.ports: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
