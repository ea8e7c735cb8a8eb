"""Human-readable views of a run's inputs: the partition table and heat map."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmoe_pl.run.rundir import make_folder

if TYPE_CHECKING:
    from fedmoe_pl.run.experiment import Experiment


def label_matrix(report: dict[str, Any], part: str = "train") -> np.ndarray:
    """(clients, classes) sample counts from a ``partition.json`` report."""
    out = np.zeros((len(report["clients"]), report["num_classes"]), dtype=np.int64)
    for row in report["clients"]:
        for label, n in row[part].items():
            out[row["id"], int(label)] = n
    return out


def format_table(report: dict[str, Any]) -> str:
    train, test = label_matrix(report, "train"), label_matrix(report, "test")
    k = report["num_classes"]
    head = f"{'client':>6} | " + " ".join(f"{c:>5}" for c in range(k)) + " | train  test classes"
    lines = [f"partition {report['fingerprint']}", head, "-" * len(head)]
    for i in range(len(train)):
        cells = " ".join(f"{n:>5}" for n in train[i])
        site = f"  {report['clients'][i]['site']}" if "site" in report["clients"][i] else ""
        lines.append(f"{i:>6} | {cells} | {train[i].sum():>5} {test[i].sum():>5} {(train[i] > 0).sum():>7}{site}")
    lines.append(
        f"{'total':>6} | " + " ".join(f"{n:>5}" for n in train.sum(0)) + f" | {train.sum():>5} {test.sum():>5}"
    )
    return "\n".join(lines)


def save_heatmap(report: dict[str, Any], path: Path) -> None:
    """Clients x classes training counts, with the class names, and the counts where they fit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = label_matrix(report, "train")
    k = counts.shape[1]
    names = report.get("classes") or [str(c) for c in range(k)]
    fig, ax = plt.subplots(figsize=(max(5, 0.6 * k + 2.5), max(3, 0.3 * counts.shape[0] + 1.8)))
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    if counts.size <= 600:
        top = counts.max() or 1
        for (r, c), n in np.ndenumerate(counts):
            if n:
                ax.text(c, r, str(n), ha="center", va="center", fontsize=7, color="w" if n < 0.6 * top else "k")
    ax.set_xticks(range(k), names, rotation=45 if max(map(len, names)) > 3 else 0, ha="right")
    step = max(1, counts.shape[0] // 25)
    held = (counts > 0).sum(1)
    sites = {row["id"]: f" {row['site']}" for row in report["clients"] if "site" in row}
    rows = range(0, counts.shape[0], step)
    ax.set_yticks(rows, [f"{i}{sites.get(i, '')} ({held[i]})" for i in rows])
    ax.set_xlabel("class")
    ax.set_ylabel("client (classes it holds)")
    ax.set_title(f"Training samples per client and class (partition {report['fingerprint']})")
    fig.colorbar(image, ax=ax, label="training samples")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_partition(exp: Experiment, output: Path) -> dict[str, Any]:
    """Build the data module, write ``partition.json`` and ``partition.png``, print the table."""
    make_folder(output, "--output", create=False)  # refused before the data is loaded
    exp.data.setup(exp.seed)
    report = exp.data.report()
    make_folder(output, "--output")
    (output / "partition.json").write_text(json.dumps(report, indent=2) + "\n")
    save_heatmap(report, output / "partition.png")
    print(format_table(report))
    print(f"written: {output / 'partition.json'}, {output / 'partition.png'}")
    return report
