"""Mean client accuracy at chosen rounds, per setting and method, mean ± std over seeds — and, for
drifting data, the accuracy on the data the clients held before the latest change (forgetting).

    python experiments/by_round.py runs/grids/drift --rounds 10 11 12 13 15 16 17 20

Reads every completed run directory below the given folders (``metrics.jsonl``: ``mean_acc`` and,
where the run drifts, ``mean_acc_before_drift``) and prints one markdown table per setting. A cell
is ``current / before`` where the round scored both, and a round a run did not evaluate is left out
of that cell's mean (the count of seeds is in the table).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from fedmoe_pl.analysis.results import completed_runs, mean_pm, method_order
from fedmoe_pl.run.rundir import RunDirectory

KEYS = ("mean_acc", "mean_acc_before_drift")


def cell(by_key: dict[str, list[float]]) -> str:
    """``current / before`` (or ``current`` alone), each mean ± std over seeds in percent."""
    return " / ".join(mean_pm(by_key[key], digits=1) for key in KEYS if by_key.get(key))


def accuracies(path: Path, rounds: list[int]) -> dict[int, dict[str, float]]:
    """The run's mean accuracy (and before-drift accuracy) at each of ``rounds`` it evaluated."""
    out: dict[int, dict[str, float]] = {}
    for record in RunDirectory(path).read_metrics():
        if record.get("round") in rounds and record.get("mean_acc") is not None:
            out[record["round"]] = {k: float(record[k]) for k in KEYS if record.get(k) is not None}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories or folders holding them (a grid's output)")
    parser.add_argument("--rounds", nargs="+", type=int, required=True, help="the rounds to show")
    args = parser.parse_args()
    # setting -> method -> round -> key -> values over seeds; and the seeds per (setting, method)
    table: dict[str, dict[str, dict[int, dict[str, list[float]]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    )
    seeds: dict[tuple[str, str], set[int]] = defaultdict(set)
    for run in completed_runs(args.runs):
        seeds[(run.setting, run.method)].add(run.seed)
        for round_, values in accuracies(run.path, args.rounds).items():
            for key, value in values.items():
                table[run.setting][run.method][round_][key].append(value)
    if not table:
        raise SystemExit(f"no completed run under {[str(p) for p in args.runs]}")
    for setting in sorted(table):
        print(f"\n{setting}: mean client test accuracy (%), current data / data held before the latest change\n")
        print("| method | seeds | " + " | ".join(f"round {r}" for r in args.rounds) + " |")
        print("|---|---:|" + "---:|" * len(args.rounds))
        for method in method_order(set(table[setting])):
            cells = [cell(table[setting][method].get(r, {})) for r in args.rounds]
            print(f"| {method} | {len(seeds[(setting, method)])} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
