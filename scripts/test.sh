#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite, every tier: the quick one (unit tests, doctests,
# in-process runs; what plain `pytest` runs), the 2-process DeepSpeed ZeRO-2/3 runs on CPU
# (`distributed`) and the real Slurm jobs (`slurm`, skipped without a cluster). GPU-only tests skip
# cleanly without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python -m pytest -m "quick or distributed or slurm" "$@"
