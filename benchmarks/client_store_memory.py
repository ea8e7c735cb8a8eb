"""Peak resident memory of a 1,000-client run with the disk client store and without it.

The quickstart's model zoo and method (pFedMoE, CNN-1..CNN-5, CNN-5's extractor as the global
expert) on synthetic 28x28 grey images, 1,000 clients with 2 classes each, C = 0.01 (10 clients a
round). Each store runs in a fresh process, which reports its own peak RSS; the two runs must end
with the same accuracies.

    python benchmarks/client_store_memory.py [--clients 1000] [--rounds 3] [--stores disk memory]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

GIB = 2**30


def config(folder: Path, clients: int, rounds: int, participation: float) -> Path:
    train_per_class = max(clients * 40 // 10, 60)  # about 40 training images per client
    body = {
        "seed_everything": 0,
        "data": {
            "source": {
                "class_path": "fedmoe_pl.data.Synthetic",
                "init_args": {"num_classes": 10, "image_size": 28, "train_per_class": train_per_class},
            },
            "partitioner": {"class_path": "fedmoe_pl.data.Pathological", "init_args": {"classes_per_client": 2}},
            "num_clients": clients,
            "batch_size": 64,
        },
        "client": {"zoo": ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"]},
        "algorithm": {"class_path": "fedmoe_pl.algorithms.PFedMoE", "init_args": {"global_expert": "cnn5"}},
        # Evaluated once, at the end: every client is scored then (loaded one at a time from disk).
        "federation": {"rounds": rounds, "participation": participation, "eval_every": rounds},
        "trainer": {"accelerator": "cpu"},
    }
    path = folder / "clients.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def child(config_path: str, run_dir: str, store: str) -> None:
    """One run in this process; print its result and this process's peak RSS as JSON."""
    from fedmoe_pl.cli import main

    start = time.perf_counter()
    main(["fit", "--config", config_path, "--federation.run_dir", run_dir, "--federation.client_store", store])
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"peak_rss": peak, "seconds": time.perf_counter() - start, "acc": summary["final_mean_acc"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--participation", type=float, default=0.01)
    parser.add_argument("--stores", nargs="+", default=["disk", "memory"], choices=["disk", "memory"])
    parser.add_argument("--child", nargs=3, metavar=("CONFIG", "RUN_DIR", "STORE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = config(Path(tmp), args.clients, args.rounds, args.participation)
        for store in args.stores:
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(path), str(Path(tmp) / store), store],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            results[store] = json.loads(out.stdout.strip().splitlines()[-1])
            r = results[store]
            print(
                f"client_store={store:6s} peak RSS {r['peak_rss'] / GIB:6.2f} GiB, {r['seconds']:6.1f} s, "
                f"final mean accuracy {r['acc']:.4f}",
                flush=True,
            )
    print(f"{args.clients} clients, C = {args.participation}, {args.rounds} rounds (pFedMoE, CNN-1..5)")
    if len(results) == 2:
        disk, memory = results["disk"], results["memory"]
        print(f"peak RSS disk / memory: {disk['peak_rss'] / memory['peak_rss']:.3f}")
        print(f"same final accuracy: {disk['acc'] == memory['acc']}")


if __name__ == "__main__":
    main()
