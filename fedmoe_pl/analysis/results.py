"""``fedmoe-pl report``: the paper-style table over many run directories, as markdown, CSV and plots.

Runs are grouped by setting and method and summarised over seeds (mean ± sample std). A run
started by ``fedmoe-pl grid`` names its method and setting in ``cell.json`` (the grid's axes);
any other run is described by its config (dataset, N, C, zoo, method). Only completed runs
count; the others are listed under the table.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedmoe_pl.analysis.ablation import check_pivot, pivot_markdown, plot_pivot
from fedmoe_pl.run.rundir import CELL, SUMMARY, RunDirectory, make_folder

FIRST = ("pfedmoe", "standalone")  # listed first; the other methods alphabetically


@dataclass
class Run:
    """What the report needs of one run directory."""

    path: Path
    method: str
    setting: str
    seed: int
    summary: dict[str, Any]
    rounds: list[int] = field(default_factory=list)
    accs: list[float] = field(default_factory=list)
    final_balanced: float | None = None  # the last evaluation's mean balanced accuracy (None: not recorded)
    axes: dict[str, str] = field(default_factory=dict)  # a grid cell's value on each axis (method included)

    def rounds_to(self, target: float) -> int | None:
        return next((r for r, a in zip(self.rounds, self.accs) if a >= target), None)

    @property
    def per_round(self) -> dict[str, float]:
        done = max(self.summary["rounds"], 1)
        s = self.summary
        return {
            "bytes_up": s["total_bytes_up"] / done,
            "bytes_down": s["total_bytes_down"] / done,
            "flops": s.get("total_train_flops", math.nan) / done,
        }


@dataclass(frozen=True)
class Link:
    """A client's link and, optionally, its compute, for the cost of a round in seconds.

    The model: in a round every participating client, on a link of its own (the server's is not the
    bottleneck), downloads what the server sends it, trains, and uploads, one after the other; the
    clients do this side by side, so the round takes one client's time. Its bytes are the run's
    averages per reported fit (``total_bytes_down`` and ``total_bytes_up`` over ``total_reported``),
    its compute the training FLOPs per fit over ``compute_flops`` (FLOP/s; none: transfers only).

    Args:
        up_mbps: upload rate, Mbit/s (10^6 bit/s).
        down_mbps: download rate, Mbit/s.
        compute_flops: training speed of a client, FLOP/s, or None to count transfers only.
    """

    up_mbps: float
    down_mbps: float
    compute_flops: float | None = None

    def __post_init__(self) -> None:
        for name in ("up_mbps", "down_mbps", "compute_flops"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"link {name}={value} must be a positive number")

    @property
    def name(self) -> str:
        rate = f"{self.up_mbps:g}" if self.up_mbps == self.down_mbps else f"{self.up_mbps:g}/{self.down_mbps:g}"
        return f"{rate} Mbit/s" + ("" if self.compute_flops is None else f", {human(self.compute_flops, 'FLOP/s')}")

    def seconds_per_round(self, summary: dict[str, Any]) -> float:
        """One round's seconds for a run (its ``summary.json``); NaN if no fit was reported."""
        fits = summary.get("total_reported") or 0
        if fits <= 0:
            return math.nan
        seconds = 8 * summary["total_bytes_up"] / fits / (self.up_mbps * 1e6)
        seconds += 8 * summary["total_bytes_down"] / fits / (self.down_mbps * 1e6)
        if self.compute_flops is not None:
            seconds += summary.get("total_train_flops", math.nan) / fits / self.compute_flops
        return float(seconds)


@dataclass
class CostConfig:
    """A run's cost as time, written into its ``summary.json`` under ``time``: seconds per round over
    each link and, given a ``target``, the rounds and seconds until the mean client accuracy first
    reached it (the model of :class:`Link`; ``fedmoe-pl report --link-mbps`` gives the same over seeds).

    Args:
        up_mbps: client upload rates, Mbit/s, one link each.
        down_mbps: the matching download rates; None: the same as up.
        compute_flops: a client's training speed, FLOP/s, on every link; None counts transfers only.
        target: the mean client accuracy to time; None: seconds per round only.
    """

    up_mbps: list[float] = field(default_factory=lambda: [1.0, 10.0, 100.0])
    down_mbps: list[float] | None = None
    compute_flops: float | None = None
    target: float | None = None

    def __post_init__(self) -> None:
        if self.down_mbps is not None and len(self.down_mbps) != len(self.up_mbps):
            raise ValueError(
                f"cost.down_mbps={self.down_mbps} does not match cost.up_mbps={self.up_mbps}: give one download rate "
                "per upload rate, or none (downloads as fast as uploads)"
            )
        if self.target is not None and not 0 < self.target <= 1:
            raise ValueError(f"cost.target={self.target} is an accuracy: a number in (0, 1]")
        self.links()  # each rate checked

    def links(self) -> list[Link]:
        return [Link(up, down, self.compute_flops) for up, down in zip(self.up_mbps, self.down_mbps or self.up_mbps)]

    def section(self, summary: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The ``time`` section of a summary, from the summary and the run's evaluated rounds."""
        reached = None
        if self.target is not None:
            reached = next((int(r["round"]) for r in rows if (r.get("mean_acc") or 0) >= self.target), None)
        out: dict[str, Any] = {"target": self.target, "rounds_to_target": reached, "links": []}
        for link in self.links():
            per_round = link.seconds_per_round(summary)
            entry = {**asdict(link), "name": link.name, "s_per_round": None if math.isnan(per_round) else per_round}
            if self.target is not None:
                entry["s_to_target"] = None if reached is None or math.isnan(per_round) else per_round * reached
            out["links"].append(entry)
        return out


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories among ``paths`` and below them (a grid's output holds many)."""
    found: list[Path] = []
    for path in paths:
        if not path.is_dir():
            raise FileNotFoundError(f"{str(path)!r} is not a directory; give run directories or a grid's output")
        if (path / SUMMARY).is_file():
            found.append(path)
        else:
            found += sorted(p.parent for p in path.rglob(SUMMARY) if ".slurm" not in p.parts)
    if not found:
        raise FileNotFoundError(f"no run directory (a folder with {SUMMARY}) under {[str(p) for p in paths]}")
    return list(dict.fromkeys(found))


def _describe(config: dict[str, Any]) -> tuple[str, str]:
    """(method, setting) of a run that was not started by a grid, from its resolved config."""
    method = str(config["algorithm"]["class_path"]).rsplit(".", 1)[-1].lower()
    data = config["data"]
    source = str(data["source"]["class_path"]).rsplit(".", 1)[-1]
    zoo = config["client"]["zoo"]
    zoo_name = "hetero" if len(zoo) > 1 else str(zoo[0])
    return method, f"{source}-N{data['num_clients']}-C{config['federation']['participation']}-{zoo_name}"


def load_run(path: Path) -> Run:
    """A run directory's summary, its evaluated rounds and accuracies, its method, setting and seed."""
    run_dir = RunDirectory(path)
    summary = run_dir.read_summary() or {}
    cell = run_dir.read_json(CELL)
    if cell is not None:
        axes = dict(cell["axes"])
        method = axes.pop("method", None)
        seed = int(cell["seed"])
        setting = "-".join(axes.values())
        if method is None or not setting:  # a grid of methods alone: the setting its config describes
            described_method, described_setting = _describe(run_dir.read_config())
            method, setting = method or described_method, setting or described_setting
    else:
        config = run_dir.read_config()
        method, setting = _describe(config)
        seed = int(config.get("seed_everything", 0))
    run = Run(path, method, setting, seed, summary, axes=dict(cell["axes"]) if cell is not None else {})
    for row in run_dir.read_metrics():
        if row.get("mean_acc") is not None:
            run.rounds.append(int(row["round"]))
            run.accs.append(float(row["mean_acc"]))
            run.final_balanced = row.get("mean_balanced_acc")
    return run


def method_order(methods: set[str]) -> list[str]:
    """pFedMoE and Standalone first, then the other methods alphabetically."""
    return [m for m in FIRST if m in methods] + sorted(methods - set(FIRST))


def _stats(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def completed_runs(paths: list[Path]) -> list[Run]:
    """The completed runs among ``paths`` and below them (see :func:`find_runs`)."""
    return [run for run in map(load_run, find_runs(paths)) if run.summary.get("status") == "completed"]


def mean_pm(values: Sequence[float], digits: int = 2) -> str:
    """Fractions as percent, ``mean ± std`` over them (std 0 for a single value)."""
    return _pm(*_stats(values), digits=digits)


def summarise(runs: list[Run], target: float, links: Sequence[Link] = ()) -> list[dict[str, Any]]:
    """One row per (setting, method): mean and std over seeds of every column; per link, seconds per
    round and to the target (over the seeds that reached it)."""
    groups: dict[tuple[str, str], list[Run]] = defaultdict(list)
    for run in runs:
        groups[(run.setting, run.method)].append(run)
    rows = []
    for setting in sorted({s for s, _ in groups}):
        for method in method_order({m for s, m in groups if s == setting}):
            group = sorted(groups[(setting, method)], key=lambda r: r.seed)
            row: dict[str, Any] = {"setting": setting, "method": method, "seeds": " ".join(str(r.seed) for r in group)}
            for key in ("final_mean_acc", "best_mean_acc", "wall_s"):
                row[key], row[f"{key}_std"] = _stats([r.summary[key] for r in group])
            balanced = [r.final_balanced for r in group]
            if all(b is not None for b in balanced):
                row["final_balanced_acc"], row["final_balanced_acc_std"] = _stats(balanced)  # type: ignore[arg-type]
            reached = [r.rounds_to(target) for r in group]
            hits = [x for x in reached if x is not None]
            row["rounds_to_target"], row["rounds_to_target_std"] = _stats(hits) if hits else (math.nan, math.nan)
            row["reached_target"] = f"{len(hits)}/{len(group)}"
            for key in ("bytes_up", "bytes_down", "flops"):
                row[f"{key}_per_round"] = float(np.mean([r.per_round[key] for r in group]))
            for link in links:
                per_round = [link.seconds_per_round(r.summary) for r in group]
                row[f"s_per_round@{link.name}"] = float(np.mean(per_round))
                to_target = [t * n for t, n in zip(per_round, reached) if n is not None]
                row[f"s_to_target@{link.name}"] = float(np.mean(to_target)) if to_target else math.nan
            rows.append(row)
    return rows


def _pm(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    return "-" if math.isnan(mean) else f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def human(value: float, unit: str) -> str:
    """``value`` with an SI prefix: ``human(20_809_920, "B") == "20.81 MB"``."""
    for prefix, size in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {prefix}{unit}"
    return f"{value:.0f} {unit}"


def _seconds(value: float) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:,.0f}"


def markdown(rows: list[dict[str, Any]], target: float, skipped: list[Run], links: Sequence[Link] = ()) -> str:
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    methods = method_order({r["method"] for r in rows})
    cell = {(r["setting"], r["method"]): r for r in rows}

    def overview(title: str, key: str) -> list[str]:
        """A methods x settings table of ``key`` (mean ± std over seeds; empty where a cell lacks it)."""
        lines = [title, "", "| method | " + " | ".join(settings) + " |", "|---|" + "---:|" * len(settings)]
        for m in methods:
            values = [
                _pm(cell[(s, m)][key], cell[(s, m)][f"{key}_std"]) if key in cell.get((s, m), {}) else ""
                for s in settings
            ]
            lines.append(f"| {m} | " + " | ".join(values) + " |")
        return lines

    out = overview("## Final mean client test accuracy (%), mean ± std over seeds", "final_mean_acc")
    if any("final_balanced_acc" in r for r in rows):
        out += [
            "",
            *overview(
                "## Final mean client balanced accuracy (%: each client's mean per-class accuracy), mean ± std"
                " over seeds",
                "final_balanced_acc",
            ),
        ]
    for s in settings:
        out += [
            "",
            f"## {s}",
            "",
            f"| method | seeds | final acc (%) | best acc (%) | rounds to {target:g} | bytes up / round "
            "| bytes down / round | training FLOPs / round | wall s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for m in methods:
            if (s, m) not in cell:
                continue
            r = cell[(s, m)]
            to_target = _pm(r["rounds_to_target"], r["rounds_to_target_std"], 1, 1)
            out.append(
                f"| {m} | {r['seeds']} | {_pm(r['final_mean_acc'], r['final_mean_acc_std'])} "
                f"| {_pm(r['best_mean_acc'], r['best_mean_acc_std'])} | {to_target} ({r['reached_target']}) "
                f"| {human(r['bytes_up_per_round'], 'B')} | {human(r['bytes_down_per_round'], 'B')} "
                f"| {human(r['flops_per_round'], 'FLOP')} | {_pm(r['wall_s'], r['wall_s_std'], 1, 1)} |"
            )
    if links:
        out += [
            "",
            f"## Seconds per round and to {target:g}, over links (the model of `Link`; mean over seeds)",
            "",
            "| setting | method | " + " | ".join(f"{link.name}: s/round | to {target:g}" for link in links) + " |",
            "|---|---|" + "---:|---:|" * len(links),
        ]
        for s in settings:
            for m in methods:
                if (s, m) in cell:
                    r = cell[(s, m)]
                    times = [
                        f"{_seconds(r[f's_per_round@{k.name}'])} | {_seconds(r[f's_to_target@{k.name}'])}"
                        for k in links
                    ]
                    out.append(f"| {s} | {m} | " + " | ".join(times) + " |")
    if skipped:
        out += ["", "Not counted (not completed):"]
        out += [f"- {r.path} ({r.summary.get('status')}, {r.summary.get('rounds')} rounds)" for r in skipped]
    return "\n".join(out) + "\n"


def plot_curves(runs: list[Run], output: Path) -> list[Path]:
    """Per setting, mean accuracy per round with a ± std band over seeds, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for setting in sorted({r.setting for r in runs}):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        group = [r for r in runs if r.setting == setting]
        for method in method_order({r.method for r in group}):
            curves = [r for r in group if r.method == method and r.rounds]
            if not curves:
                continue
            common = sorted(set.intersection(*(set(r.rounds) for r in curves)))
            accs = np.array([[dict(zip(r.rounds, r.accs))[x] for x in common] for r in curves]) * 100
            mean, std = accs.mean(0), accs.std(0, ddof=1) if len(curves) > 1 else np.zeros(len(common))
            (line,) = ax.plot(common, mean, label=f"{method} (n={len(curves)})", lw=1.6)
            ax.fill_between(common, mean - std, mean + std, color=line.get_color(), alpha=0.18, lw=0)
        ax.set_xlabel("round")
        ax.set_ylabel("mean client test accuracy (%)")
        ax.set_title(f"{setting}: mean ± std over seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        path = output / f"accuracy-{setting}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def write_report(
    paths: list[Path],
    output: Path,
    target: float = 0.9,
    links: Sequence[Link] = (),
    pivot: tuple[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Write ``report.md``, ``report.csv`` and one accuracy plot per setting; return the rows.
    ``links``: also the seconds per round and to the target over each (:class:`Link`). ``pivot``:
    two grid axes (rows, columns) for an ablation's tables and bar charts (:mod:`.ablation`)."""
    runs = [load_run(p) for p in find_runs(paths)]
    done = [r for r in runs if r.summary.get("status") == "completed"]
    skipped = [r for r in runs if r.summary.get("status") != "completed"]
    if not done:
        raise ValueError(f"none of the {len(runs)} runs found has completed; nothing to report")
    if pivot is not None:
        check_pivot(done, *pivot)  # refused before anything is written
    rows = summarise(done, target, links)
    make_folder(output, "--output")
    text = markdown(rows, target, skipped, links)
    if pivot is not None:
        text = pivot_markdown(done, *pivot) + "\n" + text
    (output / "report.md").write_text(text)
    with open(output / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))  # some lack balanced
        writer.writeheader()
        writer.writerows(rows)
    plots = plot_curves(done, output) + (plot_pivot(done, *pivot, output) if pivot is not None else [])
    print((output / "report.md").read_text())
    print(
        f"{len(done)} runs in {len(rows)} (setting, method) groups; written: report.md, report.csv, "
        + ", ".join(p.name for p in plots)
        + f" in {output}"
    )
    return rows
