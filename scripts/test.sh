#!/usr/bin/env bash
# Run the whole test suite (lint + type check + pytest) in the .venv made by scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
.venv/bin/ruff check .
.venv/bin/python -m mypy  # the modules listed in pyproject.toml [tool.mypy]
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
