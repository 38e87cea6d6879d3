#!/usr/bin/env bash
# Create (or reuse) .venv and install losstune with its test extras.
# TORCH_SPEC picks the torch build: the default is the CPU wheel this project is tested on;
# a CUDA user sets e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
  .venv/bin/python -m pip install -q -e ".[test]"
  touch .venv/.installed
fi
