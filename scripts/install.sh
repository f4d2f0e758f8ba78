#!/usr/bin/env bash
# Create .venv (if missing) and install packlora with pinned, measured-together versions.
# torch first, from the local CPU wheel (or CUDA where the machine has one), then DeepSpeed
# without build isolation, then the rest under constraints.txt so nothing pulls a newer torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade "pip>=23" setuptools wheel
pip install -q torch==2.13.0
pip install -q -c constraints.txt --no-build-isolation deepspeed
pip install -q -c constraints.txt -e ".[test]"
python -c "import torch, deepspeed, transformers, peft; print('installed: torch', torch.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)" 2>&1 | grep installed
