#!/usr/bin/env bash
# Install (idempotent), then run the bundled default job end to end: audit the labels, train a
# tiny Qwen2 with LoRA on the real 世说新语 chats (2 DeepSpeed ZeRO-3 processes on CPU, or one per
# GPU), write a checkpoint with its stop IDs, and decode held-out prompts with them.
# Extra arguments are passed to `packlora launch` (e.g. training.max_steps=10).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
packlora inspect configs/shishuo_tiny.yaml --json
packlora launch configs/shishuo_tiny.yaml "$@"
out=$(python -c "import sys, yaml; from packlora.training.config import load_config; print(load_config('configs/shishuo_tiny.yaml', [a for a in sys.argv[1:] if '=' in a and not a.startswith('-')]).output_dir)" "$@")
echo "== held-out replies ($out/decoded.jsonl) =="
python - "$out/decoded.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1], encoding="utf-8"):
    r = json.loads(line)
    print(f"[{r['stop_reason']}, {r['num_new_tokens']} tokens] {r['reply'][:80]!r}")
PY
echo "== a random model never learns to stop; to see a trained one stop at <|im_end|> (and the legacy bug run on): =="
echo "   .venv/bin/python scripts/see_it_stop.py    # 7 min the first time on 2 idle CPU cores (README: See it stop)"
