#!/usr/bin/env bash
# Set up, then train the quickstart federation offline on real Fashion-MNIST.
# Extra arguments go to `fedmoe-pl fit`, e.g. --federation.rounds 3.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
debian_dir=/usr/share/datasets/fashion-mnist
if [ ! -e data/FashionMNIST/raw/train-images-idx3-ubyte ] && [ ! -e "$debian_dir/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "Fashion-MNIST not found: installing Debian's dataset-fashion-mnist package" >&2
    apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null; }
  else
    echo "Fashion-MNIST not found. Install Debian's dataset-fashion-mnist package, or run with" >&2
    echo "  --data.source.init_args.download true   (needs internet)" >&2
    exit 1
  fi
fi
export WANDB_MODE="${WANDB_MODE:-offline}"
# A fresh run directory each time; --federation.run_dir among the arguments overrides it.
exec .venv/bin/fedmoe-pl fit --config configs/quickstart.yaml --federation.run_dir "runs/quickstart-$(date +%Y%m%d-%H%M%S)" "$@"
