"""An ablation over two grid axes: final accuracy as a rows x columns table and a bar chart.

``fedmoe-pl report RUNS --pivot norm hidden`` lays the grid's cells out with one axis down and one
across (``configs/grids/gate_ablation.yaml``: the gate's normalization against its hidden width),
one table and one picture for each combination of the other axes (the dataset, say). A cell is
the final mean client accuracy, mean ± sample std over the seeds that completed.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fedmoe_pl.analysis.results import Run


def check_pivot(runs: list[Run], rows: str, columns: str) -> None:
    """Refuse axes that are the same, or that a run (one not started by a grid) does not have."""
    if rows == columns:
        raise ValueError(f"--pivot {rows} {columns}: give two different axes, rows then columns")
    for axis in (rows, columns):
        lacking = [r for r in runs if axis not in r.axes]
        if lacking:
            known = sorted({a for r in runs for a in r.axes})
            raise ValueError(
                f"--pivot: {len(lacking)} runs (e.g. {str(lacking[0].path)!r}) have no grid axis {axis!r}; "
                f"the runs' axes are {known or 'none (not started by fedmoe-pl grid)'}"
            )


def _groups(runs: list[Run], rows: str, columns: str) -> dict[str, dict[tuple[str, str], list[float]]]:
    """Final accuracies by the other axes' values (a label), then by (row value, column value)."""
    out: dict[str, dict[tuple[str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        rest = "-".join(v for a, v in run.axes.items() if a not in (rows, columns)) or "all"
        out[rest][(run.axes[rows], run.axes[columns])].append(float(run.summary["final_mean_acc"]))
    return out


def _ordered(runs: list[Run], axis: str) -> list[str]:
    """An axis's values, each once, in natural order (``h16`` before ``h64`` before ``h256``)."""
    return sorted({r.axes[axis] for r in runs}, key=_natural)


def _natural(value: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", value) if part]


def _cell(values: list[float]) -> str:
    if not values:
        return ""
    arr = np.asarray(values) * 100
    std = arr.std(ddof=1) if len(arr) > 1 else 0.0
    return f"{arr.mean():.2f} ± {std:.2f} ({len(arr)})"


def pivot_markdown(runs: list[Run], rows: str, columns: str) -> str:
    """One table per value of the other axes: final mean accuracy (%), mean ± std (seeds)."""
    row_values, column_values = _ordered(runs, rows), _ordered(runs, columns)
    out = []
    for rest, cells in sorted(_groups(runs, rows, columns).items()):
        out += [
            f"## {rest}: final mean client test accuracy (%), {rows} x {columns}, mean ± std (seeds)",
            "",
            f"| {rows} \\ {columns} | " + " | ".join(column_values) + " |",
            "|---|" + "---:|" * len(column_values),
        ]
        for r in row_values:
            out.append(f"| {r} | " + " | ".join(_cell(cells.get((r, c), [])) for c in column_values) + " |")
        out.append("")
    return "\n".join(out)


def plot_pivot(runs: list[Run], rows: str, columns: str, output: Path) -> list[Path]:
    """Per value of the other axes, bars of final mean accuracy: columns along x, one bar per row value,
    error bars one std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row_values, column_values = _ordered(runs, rows), _ordered(runs, columns)
    written = []
    width = 0.8 / max(len(row_values), 1)
    for rest, cells in sorted(_groups(runs, rows, columns).items()):
        fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(column_values) + 2), 4.0))
        x = np.arange(len(column_values))
        for i, r in enumerate(row_values):
            values = [np.asarray(cells.get((r, c), [np.nan])) * 100 for c in column_values]
            means = [v.mean() for v in values]
            stds = [v.std(ddof=1) if len(v) > 1 else 0.0 for v in values]
            ax.bar(x + (i - (len(row_values) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=r)
        finite = [v * 100 for c in cells.values() for v in c]
        if finite:
            ax.set_ylim(max(0.0, min(finite) - 5), min(100.0, max(finite) + 2))
        ax.set_xticks(x, column_values)
        ax.set_xlabel(columns)
        ax.set_ylabel("final mean client test accuracy (%)")
        ax.set_title(f"{rest}: {rows} x {columns}, mean ± std over seeds")
        ax.legend(title=rows, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = output / f"pivot-{rest}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
