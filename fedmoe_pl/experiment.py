"""One experiment from configuration to summary: the body of ``fedmoe-pl fit``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import lightning as L

from fedmoe_pl.algorithms.base import Algorithm, ClientConfig
from fedmoe_pl.data import FederatedDataModule
from fedmoe_pl.federation import Federation, FederationConfig
from fedmoe_pl.rundir import RunDirectory
from fedmoe_pl.tracking import WandbConfig, WandbTracker

log = logging.getLogger(__name__)

# Config keys that may change between a run and its resumption without changing its results.
RESUMABLE_KEYS = (
    "federation.rounds",
    "federation.run_dir",
    "federation.eval_every",
    "federation.eval_clients",
    "wandb",
    "trainer",
    "resume",
    "config",
)


@dataclass
class Experiment:
    """Everything ``fit`` needs, already instantiated from the configuration."""

    seed: int
    data: FederatedDataModule
    client: ClientConfig
    algorithm: Algorithm
    federation: FederationConfig
    wandb: WandbConfig
    trainer: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config, as plain data
    config_yaml: str = ""


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): tree}


def result_config(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened config minus the keys a resumption may change."""
    flat = _flatten(config)
    return {k: v for k, v in flat.items() if not any(k == r or k.startswith(r + ".") for r in RESUMABLE_KEYS)}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} in the run, {current.get(k)!r} now" for k in keys if saved.get(k) != current.get(k)]


def summarize(fed: Federation, records: list[dict[str, Any]], fingerprint: str) -> dict[str, Any]:
    final = records[-1] if records else None
    best = max(records, key=lambda r: r["mean_acc"]) if records else None
    return {
        "rounds": fed.round,
        "final_mean_acc": final["mean_acc"] if final else None,
        "final_weighted_acc": final["weighted_acc"] if final else None,
        "best_mean_acc": best["mean_acc"] if best else None,
        "best_round": best["round"] if best else None,
        "total_bytes_up": fed.totals["bytes_up"],
        "total_bytes_down": fed.totals["bytes_down"],
        "wall_s": fed.totals["wall_s"],
        "partition_fingerprint": fingerprint,
        "clients": fed.client_table(final),
    }


def fit(exp: Experiment, resume: str | None = None) -> dict[str, Any]:
    """Train (or resume) the federation; write the run directory; return the summary."""
    exp.algorithm.check(exp.client)
    run_dir = RunDirectory(exp.federation.run_dir)
    if resume is None and (run_dir.checkpoint_path.exists() or (run_dir.path / "metrics.jsonl").exists()):
        raise ValueError(
            f"run directory {str(run_dir.path)!r} already holds a run; continue it with --resume "
            f"{run_dir.path} or choose another --federation.run_dir"
        )
    wanted = result_config(exp.config)
    checkpoint = RunDirectory.load_checkpoint(resume) if resume else None
    if checkpoint is not None:
        diff = config_differences(checkpoint["meta"]["result_config"], wanted)
        if diff:
            raise ValueError(
                "refusing to resume: the config changes results. Differences:\n  "
                + "\n  ".join(diff)
                + "\nStart a new run (another --federation.run_dir) to change these."
            )
    L.seed_everything(exp.seed, verbose=False)
    exp.data.setup(exp.seed)
    if checkpoint is not None and checkpoint["meta"]["fingerprint"] != exp.data.fingerprint:
        raise ValueError(
            f"refusing to resume: the partition fingerprint is {exp.data.fingerprint} but the run used "
            f"{checkpoint['meta']['fingerprint']}; the data on disk differs from the run's"
        )
    run_dir.create()
    run_dir.write_text("config.yaml", exp.config_yaml)
    partition = exp.data.report()
    run_dir.write_json("partition.json", partition)

    fed = Federation(exp.federation, exp.data, exp.client, exp.algorithm, exp.seed, exp.trainer)
    if checkpoint is not None:
        fed.load_state_dict(checkpoint)
        run_dir.truncate_metrics(fed.round)
    tracker = WandbTracker(exp.wandb, run_dir.path, exp.config, checkpoint["meta"]["wandb_id"] if checkpoint else None)
    fed.tracker = tracker
    fed.meta = {"result_config": wanted, "fingerprint": exp.data.fingerprint, "wandb_id": tracker.run_id}
    if checkpoint is None:
        rows = [
            [c["id"], *(c["train"].get(str(k), 0) for k in range(partition["num_classes"]))]
            for c in partition["clients"]
        ]
        tracker.log({}, step=0, tables={"partition": (["client", *map(str, range(partition["num_classes"]))], rows)})
    try:
        fed.run()
    finally:
        summary = summarize(fed, run_dir.read_metrics(), exp.data.fingerprint)
        run_dir.write_json("summary.json", summary)
        tracker.summary({k: v for k, v in summary.items() if k != "clients"})
        tracker.finish()
    return summary
