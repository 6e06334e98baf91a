#!/usr/bin/env bash
# Set up SSAM Segment in .venv/ (Python packages and offline default weights), then run the demo:
# segment a real CT image with the default adapter and print where the outputs are.
#   bash scripts/setup.sh            set up + demo
#   bash scripts/setup.sh --no-demo  set up only
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
if [ "${1:-}" != "--no-demo" ]; then
    HF_HUB_OFFLINE=1 .venv/bin/ssam demo
fi
