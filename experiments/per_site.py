"""Per-site results of finished runs: each client's final accuracy and balanced accuracy, by method,
mean ± std over seeds — for a federation whose clients are sites (``data.partitioner: Natural``).

    python experiments/per_site.py runs/grids/heart_disease

Reads every run directory below the given folders (``summary.json``, ``partition.json`` for the
site names, the last evaluated line of ``metrics.jsonl``) and prints two markdown tables.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from fedmoe_pl.analysis.results import find_runs, load_run, method_order
from fedmoe_pl.run.rundir import PARTITION, PER_CLIENT, RunDirectory


def _pm(values: list[float]) -> str:
    arr = np.asarray(values) * 100
    return f"{arr.mean():.1f} ± {arr.std(ddof=1) if len(arr) > 1 else 0.0:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories or folders holding them (a grid's output)")
    args = parser.parse_args()
    by_method: dict[str, list[dict[str, dict[str, float]]]] = defaultdict(list)
    sites: list[str] = []
    for path in find_runs(args.runs):
        run = load_run(path)
        if run.summary.get("status") != "completed":
            continue
        run_dir = RunDirectory(path)
        partition = run_dir.read_json(PARTITION) or {}
        sites = sites or [c.get("site", str(c["id"])) for c in partition.get("clients", [])]
        last = next(r for r in reversed(list(run_dir.read_metrics())) if r.get("mean_acc") is not None)
        by_method[run.method].append({k: last[PER_CLIENT][k] for k in ("client_acc", "client_balanced_acc")})
    if not by_method:
        raise SystemExit(f"no completed run under {[str(p) for p in args.runs]}")
    for key, title in (("client_acc", "accuracy"), ("client_balanced_acc", "balanced accuracy")):
        print(f"\nFinal {title} (%) per site, mean ± std over seeds\n")
        print("| method | seeds | " + " | ".join(sites) + " | mean |")
        print("|---|---:|" + "---:|" * (len(sites) + 1))
        for method in method_order(set(by_method)):
            runs = by_method[method]
            cells = [_pm([r[key][str(i)] for r in runs]) for i in range(len(sites))]
            means = [float(np.mean([r[key][str(i)] for i in range(len(sites))])) for r in runs]
            print(f"| {method} | {len(runs)} | " + " | ".join(cells) + f" | {_pm(means)} |")


if __name__ == "__main__":
    main()
