#!/usr/bin/env bash
# The benchmarks' own environment: packlora + TRL (for the side-by-side figures). TRL is never a
# packlora dependency; it lives only in benchmarks/.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x benchmarks/.venv/bin/python ] || "$PY" -m venv benchmarks/.venv
. benchmarks/.venv/bin/activate
pip install -q --upgrade "pip>=23" setuptools wheel
pip install -q torch==2.13.0
pip install -q -c constraints.txt --no-build-isolation deepspeed
pip install -q -c constraints.txt -e . "trl==1.16.0"
python -c "import trl, packlora; print('benchmarks env: trl', trl.__version__)"
