#!/usr/bin/env bash
# Time the README's CPU commands, one after another, as a user types them after `scripts/install.sh`
# (the default job, inspect, launch, decode, and the two-stage 张恨水 recipe with the tiny CPU
# overrides), and write the wall times to docs/command-times.md. Not a test: a documented
# measurement, meant for an otherwise idle machine (the load average is recorded with each line).
#
#   bash scripts/time_readme_commands.sh            # ~12 min on 2 CPU cores; rewrites docs/command-times.md
#
# The runs go to a scratch directory (WORK, default a fresh mktemp -d), never to runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh >/dev/null 2>&1 || bash scripts/install.sh  # quiet unless it fails
. .venv/bin/activate
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"
OUT=docs/command-times.md
CPU=$(cat configs/zhanghenshui/tiny_cpu.overrides)
rows=()

timed() {  # timed "shown command" command args...
  local shown=$1; shift
  local load0 t0 t1
  load0=$(cut -d' ' -f1 /proc/loadavg)
  t0=$(date +%s.%N)
  "$@" >"$WORK/last.log" 2>&1 || { echo "FAILED: $shown (log: $WORK/last.log)" >&2; tail -20 "$WORK/last.log" >&2; exit 1; }
  t1=$(date +%s.%N)
  local s pace
  s=$(python -c "print(f'{$t1 - $t0:.0f}')")
  # a training run logs "training done: N steps in T s (X s/step)": the pace, start-up not counted
  pace=$(grep -o '[0-9]* steps in [0-9]* s ([0-9.]* s/step)' "$WORK/last.log" | tail -n 1 || true)
  rows+=("| \`$shown\` | $s s | ${pace:-} | $load0 → $(cut -d' ' -f1 /proc/loadavg) |")
  echo "$s s  ${pace:+($pace)  }$shown"
}

tiny="output_dir=$WORK/shishuo-tiny"
timed "bash scripts/demo.sh" bash scripts/demo.sh "$tiny"
timed "packlora inspect configs/shishuo_tiny.yaml" packlora inspect configs/shishuo_tiny.yaml
timed "packlora inspect configs/shishuo_tiny.yaml --json" packlora inspect configs/shishuo_tiny.yaml --json
timed "packlora launch configs/shishuo_tiny.yaml training.max_steps=10 output_dir=runs/shishuo-tiny-10 --dry-run" \
  packlora launch configs/shishuo_tiny.yaml training.max_steps=10 --dry-run "$tiny-10"
timed "packlora launch configs/shishuo_tiny.yaml training.max_steps=10 output_dir=runs/shishuo-tiny-10" \
  packlora launch configs/shishuo_tiny.yaml training.max_steps=10 "$tiny-10"
timed "packlora decode runs/shishuo-tiny-10 --input .../heldout.jsonl --output ...-replies.jsonl" \
  packlora decode "$WORK/shishuo-tiny-10" --input "$WORK/shishuo-tiny-10/heldout.jsonl" --output "$WORK/replies.jsonl"
timed "packlora eval-runaway CKPT --input held_out.jsonl --output report.json" \
  packlora eval-runaway "$WORK/shishuo-tiny-10" --input "$WORK/shishuo-tiny-10/heldout.jsonl" --output "$WORK/report.json"

z=$WORK/zhanghenshui
# shellcheck disable=SC2086  # the overrides file is word-split on purpose, as the README does
timed "packlora launch configs/zhanghenshui/stage1.yaml \$(cat configs/zhanghenshui/tiny_cpu.overrides) training.max_steps=10" \
  packlora launch configs/zhanghenshui/stage1.yaml $CPU training.max_steps=10 "output_dir=$z/stage1"
# shellcheck disable=SC2086
timed "packlora launch configs/zhanghenshui/stage2.yaml \$(cat ...tiny_cpu.overrides) training.max_steps=10" \
  packlora launch configs/zhanghenshui/stage2.yaml $CPU training.max_steps=10 "output_dir=$z/stage2" "init_from=$z/stage1"
timed "packlora subset --input ../shared/data/zhanghenshui/stage2_continue.jsonl ... --ratio 0.2 --seed 1" \
  packlora subset --input ../shared/data/zhanghenshui/stage2_continue.jsonl --output "$z/correction_subset.jsonl" \
  --ratio 0.2 --seed 1 --tokenizer ../shared/assets/qwen2-tokenizer
# shellcheck disable=SC2086
timed "packlora launch configs/zhanghenshui/stage2_correction.yaml \$(cat ...tiny_cpu.overrides) training.max_steps=10" \
  packlora launch configs/zhanghenshui/stage2_correction.yaml $CPU training.max_steps=10 \
  "output_dir=$z/stage2_correction" "init_from=$z/stage1" "data.train=[$z/correction_subset.jsonl]"
timed "packlora decode runs/zhanghenshui/stage2_correction --preset zhang_henshui ..." \
  packlora decode "$z/stage2_correction" --preset zhang_henshui --input "$z/stage2_correction/heldout.jsonl" \
  --output "$z/decoded.jsonl"
timed "packlora export runs/zhanghenshui/stage2_correction --merge runs/zhanghenshui/merged" \
  packlora export "$z/stage2_correction" --merge "$z/merged"

{
  echo "# Wall time of the README's commands"
  echo
  echo "\`bash scripts/time_readme_commands.sh\`, $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPU cores"
  echo "($(python -c 'import platform; print(platform.processor() or platform.machine())')), torch $(python -c 'import torch; print(torch.__version__)'),"
  echo "transformers $(python -c 'import transformers; print(transformers.__version__)'), deepspeed $(python -c 'from importlib.metadata import version; print(version("deepspeed"))')."
  echo "One after another, installed already (\`scripts/install.sh\` is idempotent: a few seconds when"
  echo "nothing changed), outputs under a scratch directory; a command whose data another has already prepared
(inspect after the demo) reads that cache. The 张恨水 launches use"
  echo "\`configs/zhanghenshui/tiny_cpu.overrides\` and \`training.max_steps=10\`, as the README says for CPU."
  echo
  echo "| command | wall time | training: steps, loop time, s/step | 1-min load average before → after |"
  echo "|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
} >"$OUT"
echo "wrote $OUT"
