"""Seconds per round of a 3-client Flower deployment on this machine against the same run in process.

The same config both ways: pFedMoE on the quickstart's zoo (CNN-1..CNN-3 here), synthetic 28x28
images, 3 clients with 2 classes each, every client every round. The deployment
(``python -m fedmoe_pl.flower.local``: a SuperLink and one SuperNode per client, on 127.0.0.1)
exchanges real messages; its per-round wall time includes what each node does per message. It runs
twice: with every message served in the process Flower starts for it (``--worker-idle 0``: torch
and Lightning imported, the config read and the client built per message) and with a resident
worker per node that keeps them. Rounds come from each
run's ``metrics.jsonl``; round 1 also pays for the nodes' first start, so it is shown apart.

    python benchmarks/flower_round.py [--rounds 4]

Run it from a checkout (``PYTHONPATH`` on the checkout) to compare two versions of the package.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def config(folder: Path, rounds: int, zoo: tuple[str, ...] = ("cnn1", "cnn2", "cnn3")) -> Path:
    """pFedMoE on synthetic 28x28 images, one client per architecture of ``zoo``, every client every round."""
    body = {
        "seed_everything": 0,
        "data": {
            "source": {
                "class_path": "fedmoe_pl.data.Synthetic",
                "init_args": {"num_classes": 6, "image_size": 28, "train_per_class": 300, "test_per_class": 50},
            },
            "partitioner": {"class_path": "fedmoe_pl.data.Pathological", "init_args": {"classes_per_client": 2}},
            "num_clients": len(zoo),
        },
        "client": {"zoo": list(zoo)},
        "algorithm": {"class_path": "fedmoe_pl.algorithms.PFedMoE"},
        "federation": {"rounds": rounds},
        "trainer": {"accelerator": "cpu"},
    }
    path = folder / "flower-round.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def rounds_of(run_dir: Path) -> list[float]:
    return [json.loads(line)["wall_s"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = config(Path(tmp), args.rounds)
        sides = {
            "in process": ["fedmoe_pl.cli", "fit"],
            "Flower, 127.0.0.1, a process per message": ["fedmoe_pl.flower.local", "--worker-idle", "0"],
            "Flower, 127.0.0.1, a resident worker per node": ["fedmoe_pl.flower.local"],
        }
        for i, (side, module) in enumerate(sides.items()):
            run_dir = Path(tmp) / f"run-{i}"
            command = [sys.executable, "-m", *module]
            start = time.perf_counter()
            done = subprocess.run(
                [*command, "--config", str(path), "--federation.run_dir", str(run_dir)],
                env=env,
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                print(done.stdout[-2000:], done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"the {side} run failed (exit {done.returncode})")
            out[side] = {"rounds": rounds_of(run_dir), "total": time.perf_counter() - start}
    print(f"3 clients, pFedMoE, {args.rounds} rounds, synthetic 28x28 images (seconds)")
    print("| run | round 1 | later rounds (mean) | whole command |")
    print("|---|---:|---:|---:|")
    for side, r in out.items():
        later = r["rounds"][1:]
        print(f"| {side} | {r['rounds'][0]:.2f} | {sum(later) / max(len(later), 1):.2f} | {r['total']:.1f} |")


if __name__ == "__main__":
    main()
