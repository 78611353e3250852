#!/usr/bin/env bash
# The demo command of the README: set up (scripts/setup.sh), then run `lowbit-engine demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec lowbit-engine demo "$@"
