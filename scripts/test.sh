#!/usr/bin/env bash
# Set up, then run the test suite (extra arguments go to pytest). PYTHON and VENV as in setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export WANDB_MODE=disabled WANDB_SILENT=true
status=0
"${VENV:-.venv}/bin/python" -m pytest "$@" || status=$?
# pytest exits 5 when a selection collects no test; that is not a failure of the code.
[ "$status" = 5 ] && status=0
exit "$status"
