"""Final client accuracy by the number of classes a client holds, per method and setting — for runs
whose partition gives clients different class counts (``classes_per_client: [2, 8]``).

    python experiments/by_class_count.py runs/grids/class_counts

Reads every completed run directory below the given folders (``partition.json`` for each client's
classes, the last evaluated line of ``metrics.jsonl`` for its accuracy) and prints one markdown table
per setting: a cell pools the clients holding that many classes over all seeds, mean ± std (count).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from fedmoe_pl.analysis.results import completed_runs, mean_pm, method_order
from fedmoe_pl.run.rundir import PARTITION, PER_CLIENT, RunDirectory


def _cell(values: list[float]) -> str:
    return f"{mean_pm(values, digits=1)} ({len(values)})" if values else ""


def client_accuracies(path: Path) -> list[tuple[int, float]]:
    """(number of training classes, final accuracy) of every client of one run with a test set."""
    run_dir = RunDirectory(path)
    partition = run_dir.read_json(PARTITION)
    if partition is None:
        raise SystemExit(f"{str(path)!r} has no {PARTITION}; it cannot say which client holds which classes")
    last = next((r for r in reversed(run_dir.read_metrics()) if r.get("mean_acc") is not None), None)
    if last is None:
        return []
    accs = last[PER_CLIENT]["client_acc"]
    return [(len(c["train"]), float(accs[str(c["id"])])) for c in partition["clients"] if str(c["id"]) in accs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories or folders holding them (a grid's output)")
    args = parser.parse_args()
    # setting -> method -> class count -> accuracies (clients x seeds); and the seeds per (setting, method)
    table: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    seeds: dict[tuple[str, str], set[int]] = defaultdict(set)
    for run in completed_runs(args.runs):
        seeds[(run.setting, run.method)].add(run.seed)
        for count, acc in client_accuracies(run.path):
            table[run.setting][run.method][count].append(acc)
    if not table:
        raise SystemExit(f"no completed run under {[str(p) for p in args.runs]}")
    for setting in sorted(table):
        counts = sorted({k for by_count in table[setting].values() for k in by_count})
        title = "final client accuracy (%) by the client's number of classes, mean ± std (clients x seeds)"
        print(f"\n{setting}: {title}\n")
        print("| method | seeds | " + " | ".join(f"{k} classes" for k in counts) + " | all clients |")
        print("|---|---:|" + "---:|" * (len(counts) + 1))
        for method in method_order(set(table[setting])):
            by_count = table[setting][method]
            cells = [_cell(by_count.get(k, [])) for k in counts]
            everyone = [a for k in counts for a in by_count.get(k, [])]
            n_seeds = len(seeds[(setting, method)])
            print(f"| {method} | {n_seeds} | " + " | ".join(cells) + f" | {_cell(everyone)} |")


if __name__ == "__main__":
    main()
