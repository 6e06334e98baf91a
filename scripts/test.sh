#!/usr/bin/env bash
# Run the test suite (sets up .venv/ first when needed). Extra arguments go to pytest, e.g. -m "not slow".
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/ssam ] || [ pyproject.toml -nt .venv/bin/ssam ]; then
    bash scripts/setup.sh --no-demo
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest "$@"
