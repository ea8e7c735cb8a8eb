#!/usr/bin/env bash
# Set up, then run the test suite (extra arguments go to pytest). PYTHON and VENV as in setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The Slurm tests start a one-node cluster of their own (Debian's slurm-wlm and munge); the quickstart's
# executor comparison reads Debian's Fashion-MNIST. As root, install what is missing, as the quickstart
# installs its data; otherwise those tests skip and say the command that installs them.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
  && { ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null \
    || [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; }; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    slurm-wlm munge dataset-fashion-mnist >/dev/null
fi
export WANDB_MODE=disabled WANDB_SILENT=true
status=0
"${VENV:-.venv}/bin/python" -m pytest "$@" || status=$?
# pytest exits 5 when a selection collects no test; that is not a failure of the code.
[ "$status" = 5 ] && status=0
exit "$status"
