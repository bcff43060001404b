#!/usr/bin/env bash
# The GPU check in one command (bench/gpu_check.py says what it runs and how long each stage may take):
#   bash bench/gpu_check.sh [--quick] [--out FILE] [--timeout SECONDS] [--stages kernels,graphs,timings]
# Needs PyTorch and Triton with a CUDA device; not vLLM, and nothing is installed: the repository
# root goes on PYTHONPATH. PYTHON picks the interpreter (default python3).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if ! command -v "$PY" >/dev/null 2>&1; then
    echo "gpu_check: no Python interpreter '$PY' (set PYTHON=/path/to/python)" >&2
    exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PY" "$ROOT/bench/gpu_check.py" "$@"
