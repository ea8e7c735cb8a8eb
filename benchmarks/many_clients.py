"""Peak memory, start-up and seconds per round as the number of clients grows (disk client store).

The quickstart's zoo and method (pFedMoE, CNN-1..CNN-5, CNN-5's extractor as the global expert) on
one fixed synthetic data set of Fashion-MNIST's size (60,000 training and 10,000 test images,
28x28 grey, 10 classes, 2 a client) shared out over N clients, C = 0.01, 3 rounds, each round
evaluating the clients it sampled. The data does not grow with N, so what grows is the federation
itself: with clients built only when sampled and kept on disk in between, neither start-up nor
memory should. Each N runs in a fresh process, which reports its own peak RSS.

    python benchmarks/many_clients.py [--clients 100 1000 10000] [--rounds 3] [--participation 0.01]
    python benchmarks/many_clients.py --clients 1000 --eval-clients all   # every client scored each round

Start-up is the time from the process's start to the loop's (imports, config, data, partition, the
server's initial state); seconds per round are the rounds' own wall time; the end is what follows
the last round (summary, pictures).
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
STARTED = time.perf_counter()


def config(folder: Path, clients: int, rounds: int, participation: float, eval_clients: str) -> Path:
    body = {
        "seed_everything": 0,
        "data": {
            "source": {
                "class_path": "fedmoe_pl.data.Synthetic",
                "init_args": {"num_classes": 10, "image_size": 28, "train_per_class": 6000, "test_per_class": 1000},
            },
            "partitioner": {"class_path": "fedmoe_pl.data.Pathological", "init_args": {"classes_per_client": 2}},
            "num_clients": clients,
            "batch_size": 64,
        },
        "client": {"zoo": ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"]},
        "algorithm": {"class_path": "fedmoe_pl.algorithms.PFedMoE", "init_args": {"global_expert": "cnn5"}},
        "federation": {
            "rounds": rounds,
            "participation": participation,
            "eval_clients": eval_clients,
            "client_store": "disk",
        },
        "trainer": {"accelerator": "cpu"},
    }
    path = folder / f"clients-{clients}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def child(config_path: str, run_dir: str) -> None:
    """One run in this process; print its timings, result and this process's peak RSS as JSON."""
    from fedmoe_pl.cli import main
    from fedmoe_pl.run.federation import Federation

    loop_started: list[float] = []
    run = Federation.run

    def timed_run(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        loop_started.append(time.perf_counter())
        return run(self, *args, **kwargs)

    Federation.run = timed_run  # type: ignore[method-assign]
    main(["fit", "--config", config_path, "--federation.run_dir", run_dir])
    total = time.perf_counter() - STARTED
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    rounds = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    files = list((Path(run_dir) / "clients").glob("*.pt"))
    result = {
        "peak_rss": peak,
        "startup_s": loop_started[0] - STARTED,  # imports, config, data, partition, clients, server
        "after_s": total - (loop_started[0] - STARTED) - summary["wall_s"],  # summary, pictures
        "round_s": [r["wall_s"] for r in rounds],
        "acc": summary["final_mean_acc"],
        "client_files": len(files),
        "trained": summary["total_reported"],
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--participation", type=float, default=0.01)
    parser.add_argument("--eval-clients", choices=["sampled", "all"], default="sampled")
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    print(
        f"pFedMoE, CNN-1..5, 60,000 synthetic 28x28 images, C = {args.participation}, {args.rounds} rounds, "
        f"disk client store, eval_clients: {args.eval_clients}"
    )
    print("| clients | a round | peak RSS (GiB) | start-up (s) | s / round | end (s) | client files | final mean acc |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.clients:
            path = config(Path(tmp), n, args.rounds, args.participation, args.eval_clients)
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(path), str(Path(tmp) / f"run-{n}")],
                env=env,
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"the run with {n} clients failed (exit {out.returncode})")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            per_round = sum(r["round_s"]) / len(r["round_s"])
            print(
                f"| {n:,} | {r['trained'] // args.rounds} | {r['peak_rss'] / GIB:.2f} | {r['startup_s']:.1f} | "
                f"{per_round:.1f} | {r['after_s']:.1f} | {r['client_files']} | {r['acc']:.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
