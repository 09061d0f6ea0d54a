#!/usr/bin/env bash
# GPU readiness check in one command (see benchmarks/gpu_check.py; options pass through):
#   bash benchmarks/gpu_check.sh            # < 8 min on one GPU -> benchmarks/results/gpu_check.json
# Without a CUDA GPU it says so in one line, runs its CPU-runnable parts at tiny sizes and exits 0.
# Python: the checkout's .venv when there is one, else $PYTHON, else python3.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$root/.venv/bin/python" ]; then
  py="$root/.venv/bin/python"
else
  py="${PYTHON:-python3}"
fi
exec "$py" "$root/benchmarks/gpu_check.py" "$@"
