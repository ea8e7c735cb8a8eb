#!/usr/bin/env bash
# Create a virtual environment (once) and install fedmoe-pl with the exact versions in constraints.txt.
# PYTHON picks the interpreter (default python3), VENV the folder (default .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,flower]"
