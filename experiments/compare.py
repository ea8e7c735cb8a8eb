"""Run several methods on one config and seed; write a markdown table and an accuracy plot.

    python experiments/compare.py --config configs/quickstart.yaml --output results/quickstart
    python experiments/compare.py --config configs/quickstart.yaml --config configs/fmnist_n50.yaml \
        --methods pfedmoe standalone --output results/fmnist_n50 -- --federation.rounds 10

The methods are the overlays in ``--methods-dir`` (``configs/methods``): a new method is its module
plus one overlay there, nothing else. Each runs as ``fedmoe-pl fit --config CONFIG...
--config <methods-dir>/<method>.yaml`` in its own process, into ``OUTPUT/<method>``; arguments
after ``--`` go to every run. A method whose run already finished is not run again.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from fedmoe_pl.analysis.results import human, load_run, method_order

ROOT = Path(__file__).resolve().parents[1]


def discover(methods_dir: Path) -> list[str]:
    """The methods with an overlay in ``methods_dir``."""
    return method_order({p.stem for p in methods_dir.glob("*.yaml")})


def run_method(method: str, configs: list[str], methods_dir: Path, output: Path, seed: int, extra: list[str]) -> dict:
    run_dir = output / method
    overlay = methods_dir / f"{method}.yaml"
    if not overlay.exists():
        raise SystemExit(f"no overlay for method {method!r}: expected {overlay}; choose from {discover(methods_dir)}")
    argv = [
        sys.executable,
        "-m",
        "fedmoe_pl.cli",
        "fit",
        *(arg for config in configs for arg in ("--config", config)),
        "--config",
        str(overlay),
        "--seed_everything",
        str(seed),
        "--federation.run_dir",
        str(run_dir),
        *extra,
    ]
    summary = run_dir / "summary.json"
    if (run_dir / "last.ckpt").exists():
        argv += ["--resume", str(run_dir)]  # finishes an interrupted run; a finished one returns at once
    print(f"== {method}: {' '.join(argv[3:])}", flush=True)
    subprocess.run(argv, check=True)
    return json.loads(summary.read_text())


def write_table(summaries: dict[str, dict], output: Path, target: float) -> str:
    lines = [
        f"| method | final mean acc | best mean acc | best round | rounds to {target:g} | bytes up / round | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, s in summaries.items():
        per_round = s["total_bytes_up"] / max(s["rounds"], 1)
        lines.append(
            f"| {method} | {s['final_mean_acc']:.4f} | {s['best_mean_acc']:.4f} | {s['best_round']} | "
            f"{load_run(output / method).rounds_to(target) or '-'} | {human(per_round, 'B')} | {s['wall_s']:.0f} |"
        )
    text = "\n".join(lines) + "\n"
    (output / "comparison.md").write_text(text)
    return text


def plot(output: Path, methods: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in methods:
        run = load_run(output / method)
        rounds, accs = run.rounds, run.accs
        ax.plot(
            rounds,
            accs,
            marker="o" if len(rounds) < 15 else None,
            label=method,
            linewidth=2.5 if method == "pfedmoe" else 1.2,
        )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("mean client test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(output / "comparison.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, action="append", help="YAML config; repeat to overlay")
    parser.add_argument("--methods-dir", type=Path, default=ROOT / "configs" / "methods")
    parser.add_argument("--methods", nargs="+", help="default: every overlay in --methods-dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--target", type=float, default=0.95, help="mean accuracy for the rounds-to-target column")
    parser.add_argument("extra", nargs="*", help="arguments after -- go to every fedmoe-pl fit")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    methods = args.methods or discover(args.methods_dir)
    summaries = {m: run_method(m, args.config, args.methods_dir, args.output, args.seed, args.extra) for m in methods}
    print(write_table(summaries, args.output, args.target))
    plot(args.output, methods, f"{Path(args.config[-1]).stem}, seed {args.seed}")
    print(f"written: {args.output / 'comparison.md'}, {args.output / 'comparison.png'}")


if __name__ == "__main__":
    main()
