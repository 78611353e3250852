#!/usr/bin/env bash
# The test command of the README: set up (scripts/setup.sh), then run the whole CPU test suite.
# Extra arguments go to pytest. GPU tests are collected and skipped without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q "$@"   # testpaths in pyproject.toml: tests/ and the docstring examples
