#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite: unit tests, doctests and the 2-process
# DeepSpeed ZeRO-2/3 runs on CPU. GPU-only tests skip cleanly without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python -m pytest "$@"
