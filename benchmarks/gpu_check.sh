#!/usr/bin/env bash
# The GPU check: exact packed attention in bf16 per backend, packlora end to end on the GPU, and
# supervised tokens/s, peak memory and MFU per backend under ZeRO-2 and ZeRO-3 (details and the
# MFU formula: benchmarks/gpu_check.py). Writes the `gpu` section of benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_check.sh --fetch     # here (pip's registry reachable): wheels + assets -> .gpu/ (git-ignored)
#   bash benchmarks/gpu_check.sh             # on the GPU machine, with .gpu/ carried: install, run (<= 8 min on one H200)
#   bash benchmarks/gpu_check.sh --dry-run   # CPU: check the wheel list, print the commands, run the workers tiny
#
# On the GPU machine nothing can be downloaded: the carried wheels are installed into its python3
# (torch 2.11 stays), packlora is installed from this checkout, and the assets come from
# .gpu/shared (../shared does not travel). With $OUT set (the device tool's output folder), the
# report, the JSON results and the logs are copied there.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET_S=${GPU_CHECK_BUDGET_S:-390}   # for the Python part; pip install comes on top (~30 s), 8 min in all
mode=${1:-run}

case "$mode" in
  --fetch)
    PY=${PYTHON:-.venv/bin/python}
    exec "$PY" benchmarks/gpu_check.py fetch --dest .gpu
    ;;
  --dry-run)
    PY=${PYTHON:-python}
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    "$PY" benchmarks/gpu_check.py check-wheels --print-commands
    echo "GPU machine: bash benchmarks/gpu_check.sh   (device tool: command 'bash benchmarks/gpu_check.sh', carry ['.gpu'], timeout_s 540)"
    out=${GPU_CHECK_DRY_DIR:-$(mktemp -d)}
    exec "$PY" benchmarks/gpu_check.py run --dry-run --budget-s "${GPU_CHECK_BUDGET_S:-600}" \
      --work "$out/work" --results "$out/results" --write "$out/RESULTS.md"
    ;;
  run) ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--fetch | --dry-run]" >&2; exit 2 ;;
esac

start=$(date +%s)
PY=${PYTHON:-python3}
[ -d .gpu/wheels ] || { echo "no .gpu/wheels: run 'bash benchmarks/gpu_check.sh --fetch' where pip works, and carry .gpu" >&2; exit 1; }
work=${TMPDIR:-/tmp}/packlora-gpu-check
mkdir -p "$work/results"
install_cmd=$("$PY" benchmarks/gpu_check.py install-command --python "$PY")
echo "+ $install_cmd"
if ! eval "$install_cmd" > "$work/results/install.log" 2>&1; then
  # The image's environment may be read-only: fall back to a side directory on PYTHONPATH.
  echo "pip install into $("$PY" -c 'import sys; print(sys.prefix)') failed (install.log); installing to /tmp/site" | tee -a "$work/results/install.log"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl >> "$work/results/install.log" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export PATH=/tmp/site/bin:$PATH
fi
# packlora from this checkout: one import name, its folders mapped to subpackages by setup.cfg, so it is
# installed (a plain wheel build, no network), not put on PYTHONPATH.
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/packlora-site . >> "$work/results/install.log" 2>&1
export PYTHONPATH=/tmp/packlora-site${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # no network there: never wait on one
export PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH"
"$PY" -c "import deepspeed, datasets, transformers, peft, torch; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| deepspeed', deepspeed.__version__, '| peft', peft.__version__, '| datasets', datasets.__version__)" 2>&1 | grep installed | tee -a "$work/results/install.log"
echo "install took $(( $(date +%s) - start )) s"
status=0
timeout $(( BUDGET_S + 40 )) "$PY" benchmarks/gpu_check.py run --budget-s "$BUDGET_S" --shared .gpu/shared \
  --work "$work" --results "$work/results" --write benchmarks/RESULTS.md 2>&1 | tee "$work/results/gpu_check.log" || status=$?
if [ -n "${OUT:-}" ]; then  # the device tool brings back at most 8 files from $OUT
  cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
  "$PY" - "$work/results" "$OUT/gpu_check.json" <<'EOF'
import json, sys, pathlib
d = pathlib.Path(sys.argv[1])
pathlib.Path(sys.argv[2]).write_text(json.dumps({p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))}, indent=1))
EOF
  for f in gpu_check.log install.log exactness.log e2e.log throughput_zero2.log throughput_zero3.log; do
    [ -f "$work/results/$f" ] && tail -c 4000000 "$work/results/$f" > "$OUT/$f"
  done
fi
echo "gpu_check: exit $status after $(( $(date +%s) - start )) s"
exit "$status"
