"""What a round of ``configs/agnews.yaml`` costs: seconds, bytes and training FLOPs per round.

AG News cannot be fetched everywhere, so this writes synthetic text of its size and format: 120,000
training and 7,600 test items in ``train.csv`` / ``test.csv`` ("class","title","description"), 25 to
60 words each drawn from a Zipf-like list of 30,000 words plus class-marked words, which fills the
config's 20,000-id vocabulary as the real files do. The cost of a round depends on those shapes, not
on the words; the accuracies of such a run mean nothing and are not printed.

    python benchmarks/agnews_cost.py [--rounds 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def write_synthetic(folder: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(30000)])
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.csv", 120_000), ("test.csv", 7_600)):
        labels, lengths = rng.integers(0, 4, n), rng.integers(25, 60, n)
        with open(folder / name, "w", newline="") as f:
            writer = csv.writer(f, quoting=csv.QUOTE_ALL)
            for c, length in zip(labels, lengths):
                text = [
                    *words[rng.choice(len(words), length, p=p)],
                    *(f"t{4 * t + c}" for t in rng.integers(0, 500, 4)),
                ]
                writer.writerow([str(c + 1), " ".join(text[:8]), " ".join(text[8:])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="agnews-cost-"))
    write_synthetic(work / "data" / "ag_news_csv")
    run = work / "run"
    argv = [sys.executable, "-m", "fedmoe_pl.cli", "fit", "--config", str(ROOT / "configs" / "agnews.yaml")]
    argv += ["--data.source.init_args.root", str(work / "data"), "--federation.rounds", str(args.rounds)]
    argv += ["--federation.run_dir", str(run)]
    env = dict(
        os.environ, WANDB_MODE="disabled", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    print("| round | seconds | bytes up | bytes down | training FLOPs | clients |")
    print("|---:|---:|---:|---:|---:|---:|")
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        print(
            f"| {r['round']} | {r['wall_s']:.1f} | {r['bytes_up'] / 1e6:.1f} MB | {r['bytes_down'] / 1e6:.1f} MB "
            f"| {r['train_flops'] / 1e12:.2f} TFLOP | {r['reported']} |"
        )
    models = {c["model"]: c["params_total"] for c in json.loads((run / "summary.json").read_text())["clients"]}
    print("parameters per client model (with the gate and the global expert):", models)


if __name__ == "__main__":
    main()
