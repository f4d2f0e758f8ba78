"""Run the launcher command as ``packlora launch``'s child and answer for its whole process tree.

``run_supervised(argv, env)`` starts the launcher (``deepspeed`` or ``torchrun``) as its child, in
``packlora launch``'s own process group (so ``kill -9 -- -PGID`` still reaches every process), and then:

* **Stops the tree on a signal.** SIGTERM (``kill``, ``timeout``, CI runners, supervisors), SIGINT
  (Ctrl-C) and SIGHUP (the terminal closed) sent to ``packlora launch`` are passed on as SIGTERM to
  every process of the tree: the launcher, its helpers and every rank, also those torchrun starts in
  sessions of their own. SIGTERM is the one signal each of them stops on without a traceback
  (deepspeed's ``launch.py`` and torchrun's agent then stop their children too; a training process
  dies of it). The tree starts with SIGINT ignored (an ignored signal stays ignored across
  ``exec``, and Python then installs no ``KeyboardInterrupt`` handler), so the Ctrl-C a terminal
  sends to the whole foreground group prints no traceback in deepspeed's runner or a rank; launchers
  that set a SIGINT handler of their own keep it. The tree is snapshotted every ``POLL_S`` seconds
  while it runs, so a process whose parent has already exited is still found. Whatever is left after
  ``GRACE_S`` seconds gets SIGKILL. ``packlora launch`` then prints one line and exits
  ``128 + signal`` (143 for SIGTERM, 130 for SIGINT, 129 for SIGHUP), with no traceback. A second
  signal kills the tree at once. SIGKILL to ``packlora launch`` alone cannot be passed on: send it
  SIGTERM, or SIGKILL to its whole process group.
* **Explains a rank killed by signal 9.** The launcher's output is passed through as it comes (in
  chunks, so progress bars still redraw) and scanned for the launchers' own reports of a child
  killed by SIGKILL (``KILLED_BY_SIGKILL``); the usual sender is the kernel's out-of-memory
  killer, so the run ends with ``OOM_HINT``.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from packlora.launcher.commands import KILLED_BY_SIGKILL, OOM_HINT

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
POLL_S = 1.0
"""How often the process tree is snapshotted while it runs."""
GRACE_S = 30.0
"""How long the tree may take to exit after SIGTERM before what is left is killed (SIGKILL)."""
_TAIL = 256  # bytes of the previous chunk kept so that a report split across two reads still matches


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a supervised launch ended."""

    returncode: int
    """The launcher's exit status (negative: killed by that signal)."""
    stop_signal: int | None = None
    """The signal that stopped it (SIGTERM, SIGINT or SIGHUP sent to ``packlora launch``), else None."""
    killed_by_sigkill: bool = False
    """The launcher reported a child killed by signal 9 (``KILLED_BY_SIGKILL``)."""
    processes: int = 0
    """Processes of the tree signalled after ``stop_signal``."""


def run_supervised(argv: list[str], env: dict[str, str]) -> Outcome:
    """Run ``argv`` with ``env``, passing its output through, until it and its whole tree have ended
    (see the module docstring). Installs handlers for ``STOP_SIGNALS`` while it runs (main thread
    only). A process of the tree still running after the launcher exited on its own is an orphan: it
    gets SIGTERM too (then SIGKILL after ``GRACE_S``)."""
    import psutil

    received: list[int] = []
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    seen: dict[int, float] = {}  # pid -> create_time of every process of the tree seen so far
    killed = threading.Event()
    signalled, deadline = 0, None
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited by the child: see the module docstring
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for s in STOP_SIGNALS:
            signal.signal(s, lambda signum, frame: received.append(signum))
        pumps = [threading.Thread(target=_pump, args=(stream, out, killed), daemon=True)
                 for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
        for t in pumps:
            t.start()
        while True:
            _snapshot(proc.pid, seen, psutil)
            if received and deadline is None:  # the first stop signal: SIGTERM to the whole tree
                signalled = _signal_tree(seen, signal.SIGTERM, psutil)
                deadline = time.monotonic() + GRACE_S
            elif received and (len(received) > 1 or time.monotonic() > deadline):
                _signal_tree(seen, signal.SIGKILL, psutil)
            try:
                proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                continue
        if _processes(seen, psutil):  # after a stop, or orphans of a launcher that ended on its own
            if deadline is None:
                _signal_tree(seen, signal.SIGTERM, psutil)
                deadline = time.monotonic() + GRACE_S
            _wait_tree(seen, deadline - time.monotonic(), psutil)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for t in pumps:
        t.join(timeout=5)
    return Outcome(proc.returncode, received[0] if received else None, killed.is_set(), signalled)


def _pump(stream, out, killed: threading.Event) -> None:
    """Copy ``stream`` to ``out`` chunk by chunk; set ``killed`` when a chunk reports a SIGKILL."""
    pattern = re.compile(KILLED_BY_SIGKILL.encode())
    tail = b""
    fd = stream.fileno()
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        if hasattr(out, "buffer"):
            out.buffer.write(chunk)
        else:  # a text-only stream (a test's capture)
            out.write(chunk.decode(errors="replace"))
        out.flush()
        if pattern.search(tail + chunk):
            killed.set()
        tail = (tail + chunk)[-_TAIL:]


def _snapshot(root: int, seen: dict[int, float], psutil) -> None:
    try:
        top = psutil.Process(root)
        for p in [top, *top.children(recursive=True)]:
            seen.setdefault(p.pid, p.create_time())
    except psutil.Error:
        pass


def _processes(seen: dict[int, float], psutil) -> list:
    """The processes of ``seen`` still running (the same process: pid and start time match)."""
    alive = []
    for pid, created in seen.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            pass
    return alive


def _signal_tree(seen: dict[int, float], sig: int, psutil) -> int:
    procs = _processes(seen, psutil)
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass
    return len(procs)


def _wait_tree(seen: dict[int, float], timeout: float, psutil) -> None:
    procs = _processes(seen, psutil)
    _, alive = psutil.wait_procs(procs, timeout=max(timeout, 0.1))
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def stopped_message(outcome: Outcome) -> str:
    """The one line ``packlora launch`` prints after a stop signal."""
    name = signal.Signals(outcome.stop_signal).name
    return (f"packlora launch: stopped by {name}: sent SIGTERM to the {outcome.processes} processes of the run "
            f"(the launcher and its ranks) and waited for them; none is left. Exit code {128 + outcome.stop_signal}")
