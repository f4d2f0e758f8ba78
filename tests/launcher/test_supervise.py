"""``launcher.supervise`` on real processes (a bash stand-in for the launcher, ``sleep`` for the ranks):
a stop signal reaches every process of the tree, also one in a session of its own as torchrun starts
its workers, and a launcher's report of a SIGKILL is noticed. The 2-process DeepSpeed version is in
``tests/launcher/test_rank_failure.py``."""
from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from packlora.launcher.supervise import run_supervised

FAKE_LAUNCHER = """\
#!/bin/bash
# two "ranks": one in a session of its own (as torchrun starts them), one in the launcher's
setsid bash -c 'echo $$ >> "$1/pids"; exec sleep 300' _ "$1" &
bash -c 'echo $$ >> "$1/pids"; exec sleep 300' _ "$1" &
while [ "$(wc -l < "$1/pids" 2>/dev/null || echo 0)" -lt 2 ]; do sleep 0.05; done
echo ready
wait
"""
RUNNER = textwrap.dedent("""\
    import os, sys
    from packlora.launcher.supervise import run_supervised, stopped_message
    outcome = run_supervised(["bash", sys.argv[1], sys.argv[2]], dict(os.environ))
    if outcome.stop_signal is not None:
        print(stopped_message(outcome), file=sys.stderr)
        sys.exit(128 + outcome.stop_signal)
    sys.exit(outcome.returncode)
""")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_a_stop_signal_ends_every_process_of_the_tree_and_exits_128_plus_it(tmp_path, sig, code):
    launcher = tmp_path / "launcher.sh"
    launcher.write_text(FAKE_LAUNCHER)
    with subprocess.Popen([sys.executable, "-c", RUNNER, str(launcher), str(tmp_path)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:  # fmt: skip
        try:
            assert proc.stdout.readline() == "ready\n"
            ranks = [psutil.Process(int(pid)) for pid in (tmp_path / "pids").read_text().split()]
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
        except BaseException:
            proc.kill()
            raise
    _, alive = psutil.wait_procs(ranks, timeout=5)

    assert proc.returncode == code, err
    assert not alive, [p.pid for p in alive]
    assert err.splitlines()[-1].startswith(f"packlora launch: stopped by {sig.name}: sent SIGTERM to the 3 processes"), err  # launcher + 2
    assert "Traceback" not in err


def test_a_launchers_report_of_a_sigkill_is_noticed_and_its_output_passed_through(tmp_path, capsys):
    launcher = tmp_path / "launcher.sh"
    launcher.write_text("echo step 1\necho \"[launch.py] ['python', '-m', 'packlora.train'] exits with return code = -9\" >&2\n"
                        "exit 247\n")
    outcome = run_supervised(["bash", str(launcher)], {"PATH": "/usr/bin:/bin"})

    assert (outcome.returncode, outcome.killed_by_sigkill, outcome.stop_signal) == (247, True, None)
    out = capsys.readouterr()
    assert out.out == "step 1\n" and "exits with return code = -9" in out.err


def test_a_terminals_ctrl_c_to_the_whole_group_prints_no_traceback_in_the_tree(tmp_path):
    """A terminal sends SIGINT to every process of its foreground group: the launch stops the tree
    (exit 130), and neither a Python launcher (as deepspeed's runner is) nor its Python "ranks" die of
    a KeyboardInterrupt traceback."""
    import os

    launcher = tmp_path / "launcher.py"
    launcher.write_text(textwrap.dedent("""\
        import subprocess, sys
        ranks = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"]) for _ in range(2)]
        open(sys.argv[1] + "/pids", "w").write("".join(f"{p.pid}\\n" for p in ranks))
        print("ready", flush=True)
        for p in ranks:
            p.wait()
    """))
    runner = RUNNER.replace('["bash", sys.argv[1], sys.argv[2]]', '[sys.executable, sys.argv[1], sys.argv[2]]')
    with subprocess.Popen([sys.executable, "-c", runner, str(launcher), str(tmp_path)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:  # fmt: skip
        try:
            assert proc.stdout.readline() == "ready\n"
            ranks = [psutil.Process(int(pid)) for pid in (tmp_path / "pids").read_text().split()]
            os.killpg(proc.pid, signal.SIGINT)  # the whole group, as a terminal's Ctrl-C
            _, err = proc.communicate(timeout=60)
        except BaseException:
            proc.kill()
            raise
    _, alive = psutil.wait_procs(ranks, timeout=5)

    assert proc.returncode == 130, err
    assert not alive and "Traceback" not in err and "KeyboardInterrupt" not in err, err
