#!/usr/bin/env bash
# Creates .venv and installs dipcohort with its test extras.
# torch: a CPU build on machines without an NVIDIA GPU (never a multi-GB CUDA build there),
# the default PyPI build (CUDA) where nvidia-smi sees a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
stamp=.venv/.dipcohort-installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then exit 0; fi
python -m pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch==2.13.0"
  elif ls "${PIP_FIND_LINKS:-/nonexistent}"/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
    python -m pip install -q "torch==2.13.0"          # the CPU wheel found on local disk
  else
    python -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
python -m pip install -q -e ".[test]"
touch "$stamp"
