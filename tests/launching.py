"""Start real `packlora launch` runs from tests: one environment, one error report."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def launch_env() -> dict[str, str]:
    """This environment, with the venv's ``bin`` first on PATH (``packlora launch`` looks ``deepspeed``
    up there) and no leftover launcher or TensorBoard variables."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TENSORBOARD_LOGGING_DIR"):
        env.pop(name, None)
    return env


def launch(config: Path, *args: str, log: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``packlora launch CONFIG ARGS...`` from the repo root; fail the test with the output tail
    if it exits non-zero. The whole output is kept in ``log``."""
    cmd = [sys.executable, "-m", "packlora.cli", "launch", str(config), *args]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=launch_env(), capture_output=True, text=True, timeout=timeout)
    log.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        pytest.fail(f"`{' '.join(cmd)}` exited {proc.returncode}; last output:\n{(proc.stdout + proc.stderr)[-6000:]}")
    return proc
