"""Pictures of a run, drawn from its directory alone (``metrics.jsonl``, ``summary.json``, ``partition.json``).

Written at the end of every run and by ``fedmoe-pl plot RUN_DIR`` (also for an interrupted run):

- ``accuracy.png``: mean client test accuracy per round, the spread over clients (± std, min); with
  drifting data (``data.drift``), also the mean accuracy on the data the clients held before the
  latest change (forgetting), and the rounds of the changes;
- ``client_accuracy.png``: each client's final test accuracy, coloured by its model;
- ``communication.png``: bytes up and down per round;
- for a method with a gate (pFedMoE): ``gate_by_class.png``, the client-by-class mean gate weight
  on the global expert in the last evaluated round, and ``gate_histograms.png``, the
  distribution of per-sample gate weights of a few clients over the rounds;
- with the paper's Switchable-Norm gate: ``switch_norm.png``, each client's learned weight on batch
  (against layer) statistics at the gate's input, for the mean and the variance, by round.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

import numpy as np

from fedmoe_pl.run.rundir import HISTOGRAMS, METRICS, PARTITION, PER_CLIENT, PER_CLIENT_CLASS, RunDirectory, make_folder

HIST_CLIENTS = 4  # clients shown in the gate-histogram figure


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = RunDirectory(run_dir).read_metrics()
    if not rows:
        raise FileNotFoundError(f"{str(run_dir)!r} has no {METRICS}: is it a run directory with a finished round?")
    return rows


def class_names(run_dir: Path, rows: list[dict[str, Any]], gate: str) -> list[str]:
    """The dataset's class names from ``partition.json``, or label numbers up to the largest gated class."""
    try:
        partition = RunDirectory(run_dir).read_json(PARTITION)
        return list(partition.get("classes") or map(str, range(int(partition["num_classes"]))))
    except (AttributeError, ValueError, KeyError):
        top = max(int(c) for r in rows for m in _by_class(r).get(f"{gate}_class_mean", {}).values() for c in m)
        return [str(c) for c in range(top + 1)]


def _by_class(row: dict[str, Any]) -> dict[str, Any]:
    return row.get(PER_CLIENT_CLASS, {})  # type: ignore[no-any-return]


def _whole_rounds(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_accuracy(rows: list[dict[str, Any]], out: Path, drift_rounds: list[int] | None = None) -> Path:
    plt = _pyplot()
    evaluated = [r for r in rows if r.get("mean_acc") is not None]
    rounds = [r["round"] for r in evaluated]
    mean = np.array([r["mean_acc"] for r in evaluated]) * 100
    std = np.array([r.get("std_acc", 0.0) for r in evaluated]) * 100
    low = np.array([r.get("min_acc", r["mean_acc"]) for r in evaluated]) * 100
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(rounds, mean, marker="o", ms=3, lw=1.8, color="C0", label="mean over clients")
    band = (np.maximum(mean - std, 0), np.minimum(mean + std, 100))
    ax.fill_between(rounds, *band, color="C0", alpha=0.2, lw=0, label="± std")
    ax.plot(rounds, low, ls=":", color="C3", lw=1.2, label="worst client")
    before = [
        (r["round"], r["mean_acc_before_drift"] * 100) for r in evaluated if r.get("mean_acc_before_drift") is not None
    ]
    # one line per phase: after each change "before" refers to other data, so the line breaks there
    starts = sorted(set(drift_rounds or []))
    phases: dict[int, list[tuple[int, float]]] = {}
    for round_, acc in before:
        phases.setdefault(bisect.bisect_right(starts, round_), []).append((round_, acc))
    for i, points in enumerate(phases.values()):
        label = "mean, on the data held before the latest change" if i == 0 else None
        ax.plot(*zip(*points), marker="s", ms=3, lw=1.5, color="C2", label=label)
    for i, start in enumerate(drift_rounds or []):
        ax.axvline(start - 0.5, color="0.4", ls="--", lw=1, label="data drifts" if i == 0 else None)
    ax.set(xlabel="round", ylabel="client test accuracy (%)", title="Mean client test accuracy per round")
    _whole_rounds(ax)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, out / "accuracy.png")


def plot_client_accuracy(rows: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> Path:
    plt = _pyplot()
    last = next(r for r in reversed(rows) if r.get(PER_CLIENT, {}).get("client_acc"))
    clients = summary.get("clients") or []
    models = {c["id"]: c["model"] for c in clients}
    client_acc = last[PER_CLIENT]["client_acc"]
    ids = sorted(int(k) for k in client_acc)
    accs = [client_acc[str(i)] * 100 for i in ids]
    names = sorted({models.get(i, "?") for i in ids})
    colours = {m: f"C{k % 10}" for k, m in enumerate(names)}
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(ids) + 3), 4))
    ax.bar([str(i) for i in ids], accs, color=[colours[models.get(i, "?")] for i in ids])
    from matplotlib.patches import Patch

    ax.set(xlabel="client", ylabel="test accuracy (%)", ylim=(0, 100))
    ax.set_title(f"Test accuracy per client after round {last['round']}")
    if len(ids) > 30:
        ax.set_xticks(range(0, len(ids), max(1, len(ids) // 20)))
    handles = [Patch(color=colours[name], label=name) for name in names]
    ax.legend(
        handles=handles,
        title="model",
        fontsize=8,
        ncol=min(len(names), 6),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.18),
    )
    return _save(fig, out / "client_accuracy.png")


def plot_communication(rows: list[dict[str, Any]], out: Path) -> Path:
    plt = _pyplot()
    rounds = [r["round"] for r in rows]
    up = np.array([r["bytes_up"] for r in rows]) / 1e6
    down = np.array([r["bytes_down"] for r in rows]) / 1e6
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.4
    ax.bar(np.array(rounds) - width / 2, up, width, label="up (clients to server)")
    ax.bar(np.array(rounds) + width / 2, down, width, label="down (server to clients)")
    ax.set(xlabel="round", ylabel="MB per round", title="Communication per round")
    _whole_rounds(ax)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out / "communication.png")


def plot_gate_by_class(
    rows: list[dict[str, Any]], summary: dict[str, Any], gate: str, classes: list[str], out: Path
) -> Path:
    plt = _pyplot()
    last = next(r for r in reversed(rows) if _by_class(r).get(f"{gate}_class_mean"))
    means = _by_class(last)[f"{gate}_class_mean"]
    ids = sorted(int(k) for k in means)
    grid = np.full((len(ids), len(classes)), np.nan)
    for row, cid in enumerate(ids):
        for label, value in means[str(cid)].items():
            grid[row, int(label)] = value
    models = {c["id"]: c["model"] for c in summary.get("clients") or []}
    fig, ax = plt.subplots(figsize=(max(5, 0.55 * len(classes) + 2.5), max(3, 0.3 * len(ids) + 1.6)))
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    if len(ids) * len(classes) <= 400:
        for (r, c), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(c, r, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w" if value < 0.6 else "k")
    ax.set_xticks(range(len(classes)), classes, rotation=45 if max(map(len, classes)) > 3 else 0, ha="right")
    step = max(1, len(ids) // 25)
    ax.set_yticks(range(0, len(ids), step), [f"{ids[i]} ({models.get(ids[i], '?')})" for i in range(0, len(ids), step)])
    ax.set(xlabel="class (blank: not in the client's test set)", ylabel="client (model)")
    ax.set_title(f"Mean gate weight on the global expert, round {last['round']}")
    fig.colorbar(image, ax=ax, label="weight on global expert (0 = local only, 1 = global only)")
    return _save(fig, out / "gate_by_class.png")


def plot_gate_histograms(rows: list[dict[str, Any]], summary: dict[str, Any], gate: str, out: Path) -> Path:
    plt = _pyplot()
    evaluated = [(r["round"], r[HISTOGRAMS][gate]) for r in rows if r.get(HISTOGRAMS, {}).get(gate)]
    rounds = [number for number, _ in evaluated]
    last = evaluated[-1][1]
    ids = sorted(int(k) for k in last)[:HIST_CLIENTS]
    models = {c["id"]: c["model"] for c in summary.get("clients") or []}
    bins = len(last[str(ids[0])])
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(
        1, len(ids), figsize=(3.2 * len(ids) + 1.5, 3.8), squeeze=False, sharey=True, layout="constrained"
    )
    image = None
    for ax, cid in zip(axes[0], ids):
        counts = np.array([hists.get(str(cid), [0] * bins) for _, hists in evaluated], dtype=float)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        image = ax.imshow(
            share,
            aspect="auto",
            origin="lower",
            cmap="magma",
            vmin=0,
            vmax=1,
            extent=(0, 1, rounds[0] - 0.5, rounds[-1] + 0.5),
        )
        ax.set(xlabel="weight on global expert", title=f"client {cid} ({models.get(cid, '?')})")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0][0].set_ylabel("round")
    fig.suptitle("Per-sample gate weights on each client's test set, by round")
    fig.colorbar(image, ax=axes[0].tolist(), label="share of test samples")
    fig.savefig(out / "gate_histograms.png", dpi=120)
    plt.close(fig)
    return out / "gate_histograms.png"


SWITCH = ("gate_switch_mean_batch", "gate_switch_var_batch")  # pFedMoE's Switchable-Norm weights on batch statistics


def plot_switch_norm(rows: list[dict[str, Any]], summary: dict[str, Any], out: Path) -> Path:
    """Each client's learned weight on batch statistics (against layer statistics) at the gate's input,
    for the mean and for the variance, by round."""
    plt = _pyplot()
    evaluated = [r for r in rows if SWITCH[0] in r.get(PER_CLIENT, {})]
    models = {c["id"]: c["model"] for c in summary.get("clients") or []}
    ids = sorted({int(c) for r in evaluated for c in r[PER_CLIENT][SWITCH[0]]})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key, what in zip(axes, SWITCH, ("mean", "variance")):
        for cid in ids:
            points = [(r["round"], r[PER_CLIENT][key][str(cid)]) for r in evaluated if str(cid) in r[PER_CLIENT][key]]
            ax.plot(*zip(*points), marker=".", label=f"{cid} ({models.get(cid, '?')})")
        ax.set(xlabel="round", title=f"Gate input: weight on batch statistics ({what})", ylim=(0, 1))
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        _whole_rounds(ax)
    axes[0].set_ylabel("batch weight (1 - layer weight)")
    if len(ids) <= 12:
        axes[1].legend(title="client (model)", fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(fig, out / "switch_norm.png")


def plot_run(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Draw every picture the run's files support into ``out`` (default: the run directory)."""
    run_dir = Path(run_dir)
    out = run_dir if out is None else Path(out)
    rows = _rows(run_dir)
    if not rows:
        raise ValueError(f"{str(run_dir)!r} has no completed round yet; nothing to plot")
    summary = RunDirectory(run_dir).read_summary() or {}
    make_folder(out, "--output")
    written = [plot_communication(rows, out)]
    if any(r.get("mean_acc") is not None for r in rows):
        partition = RunDirectory(run_dir).read_json(PARTITION) or {}
        drift_rounds = sorted({int(change["round"]) for change in partition.get("drift", [])})
        written += [plot_accuracy(rows, out, drift_rounds), plot_client_accuracy(rows, summary, out)]
    gates = sorted({gate for r in rows for gate in r.get(HISTOGRAMS, {})})  # the gates' weights (evaluation.py)
    if any(SWITCH[0] in r.get(PER_CLIENT, {}) for r in rows):
        written.append(plot_switch_norm(rows, summary, out))
    for gate in gates:
        written += [
            plot_gate_by_class(rows, summary, gate, class_names(run_dir, rows, gate), out),
            plot_gate_histograms(rows, summary, gate, out),
        ]
    return written
