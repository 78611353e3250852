#!/usr/bin/env bash
# The demo command of the README: set up (scripts/setup.sh), then run `lowbit-engine demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec lowbit-engine demo "$@"   # prints the fidelity and writes demo-<fmt>-r<rank>.png here (--out to choose)
