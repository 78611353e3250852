#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with torch (CPU build 2.13.0 unless TORCH_SPEC
# says otherwise), the dev requirements and lowbit-engine itself built in place (C++ CPU references
# always; CUDA kernels too when nvcc is found, see README). Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -c "import torch" 2>/dev/null || python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -r requirements-dev.txt
python -m pip install -q --no-build-isolation -e .
python -c "import lowbit_engine, json; print('lowbit-engine build:', json.dumps(lowbit_engine.build_info()))"
