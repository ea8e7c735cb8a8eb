"""One experiment from configuration to summary: the body of ``fedmoe-pl fit``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import lightning as L

from fedmoe_pl.algorithms.base import Algorithm, ClientConfig
from fedmoe_pl.data import FederatedDataModule
from fedmoe_pl.errors import Interrupted, RunError
from fedmoe_pl.federation import Federation, FederationConfig
from fedmoe_pl.rundir import RunDirectory
from fedmoe_pl.signals import StopSignals
from fedmoe_pl.tracking import WandbConfig, WandbTracker

log = logging.getLogger(__name__)

# Config keys that may change between a run and its resumption without changing its results.
RESUMABLE_KEYS = (
    "federation.rounds",
    "federation.run_dir",
    "federation.eval_every",
    "federation.eval_clients",
    "federation.on_client_error",
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


def summarize(fed: Federation, records: list[dict[str, Any]], fingerprint: str, status: str) -> dict[str, Any]:
    """The run's ``summary.json``; ``status`` is ``completed``, ``interrupted`` or ``failed``."""
    records = [r for r in records if r.get("mean_acc") is not None]
    final = records[-1] if records else None
    best = max(records, key=lambda r: r["mean_acc"]) if records else None
    return {
        "status": status,
        "rounds": fed.round,
        "rounds_planned": fed.cfg.rounds,
        "final_mean_acc": final["mean_acc"] if final else None,
        "final_weighted_acc": final["weighted_acc"] if final else None,
        "best_mean_acc": best["mean_acc"] if best else None,
        "best_round": best["round"] if best else None,
        "total_bytes_up": fed.totals["bytes_up"],
        "total_bytes_down": fed.totals["bytes_down"],
        "total_dropped": fed.totals["dropped"],
        "total_failed": fed.totals["failed"],
        "wall_s": fed.totals["wall_s"],
        "partition_fingerprint": fingerprint,
        "clients": fed.client_table(final),
    }


def check_trainer(trainer: dict[str, Any]) -> None:
    """Build a throwaway Trainer, so that an accelerator this machine lacks is refused before anything is written."""
    try:
        L.Trainer(**trainer, devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    except Exception as err:
        raise ValueError(
            f"the trainer settings {trainer} cannot run on this machine: {err}. "
            "Use --trainer.accelerator auto (a GPU when there is one, else the CPU) or cpu"
        ) from err


def fit(exp: Experiment, resume: str | None = None) -> dict[str, Any]:
    """Train (or resume) the federation; write the run directory; return the summary.

    Everything that can refuse the command is checked before the run directory is touched.
    """
    exp.algorithm.check(exp.client)
    check_trainer(exp.trainer)
    run_dir = RunDirectory(exp.federation.run_dir)
    if resume is not None and RunDirectory.locate(resume).resolve() != run_dir.path.resolve():
        raise ValueError(
            f"--resume {resume} names another run than federation.run_dir {str(run_dir.path)!r}; "
            "a resumed run continues in its own directory"
        )
    if resume is None and run_dir.holds_run():
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
        if checkpoint["round"] > exp.federation.rounds:
            raise ValueError(
                f"refusing to resume: the run has completed {checkpoint['round']} rounds, more than "
                f"federation.rounds={exp.federation.rounds}; ask for at least {checkpoint['round']} rounds"
            )
    L.seed_everything(exp.seed, verbose=False)
    exp.data.setup(exp.seed)
    if checkpoint is not None and checkpoint["meta"]["fingerprint"] != exp.data.fingerprint:
        raise ValueError(
            f"refusing to resume: the partition fingerprint is {exp.data.fingerprint} but the run used "
            f"{checkpoint['meta']['fingerprint']}; the data on disk differs from the run's"
        )
    run_dir.acquire()
    try:
        if resume is None and run_dir.holds_run():  # a run that started meanwhile, before the lock
            raise ValueError(f"run directory {str(run_dir.path)!r} already holds a run started by another process")
        return _train(exp, run_dir, checkpoint, wanted)
    finally:
        run_dir.release()


def _train(exp: Experiment, run_dir: RunDirectory, checkpoint: dict[str, Any] | None, wanted: dict[str, Any]) -> Any:
    run_dir.write_text("config.yaml", exp.config_yaml)
    partition = exp.data.report()
    run_dir.write_json("partition.json", partition)
    tracker = WandbTracker(exp.wandb, run_dir.path, exp.config, checkpoint["meta"]["wandb_id"] if checkpoint else None)
    fed = Federation(
        exp.federation, exp.data, exp.client, exp.algorithm, exp.seed, exp.trainer, tracker=tracker, run_dir=run_dir
    )
    fed.meta = {"result_config": wanted, "fingerprint": exp.data.fingerprint, "wandb_id": tracker.run_id}
    if checkpoint is not None:
        fed.load_state_dict(checkpoint)
    run_dir.truncate_metrics(fed.round)  # lines written after the last checkpoint are redone
    if checkpoint is None:
        rows = [
            [c["id"], *(c["train"].get(str(k), 0) for k in range(partition["num_classes"]))]
            for c in partition["clients"]
        ]
        tracker.log({}, step=0, tables={"partition": (["client", *map(str, range(partition["num_classes"]))], rows)})
        run_dir.save_checkpoint(fed.state_dict())  # round 0: from now on the run can always be resumed
    status, reason = "failed", None
    with StopSignals() as signals:
        try:
            fed.run(signals)
            status = "completed"
        except Interrupted as stop:
            stop.round, status, reason = fed.round, "interrupted", stop.name
            raise
        except BaseException as err:
            reason = f"{type(err).__name__}: {err}"
            raise
        finally:
            summary = summarize(fed, run_dir.read_metrics(), exp.data.fingerprint, status)
            summary["reason"] = reason
            _close(run_dir, tracker, summary)
    return summary


def _close(run_dir: RunDirectory, tracker: WandbTracker, summary: dict[str, Any]) -> None:
    """Write the summary and end the W&B run; a failure here must not hide why the run ended."""
    try:
        run_dir.write_json("summary.json", summary)
    except RunError as err:
        log.error("%s", err)
    tracker.summary({k: v for k, v in summary.items() if k != "clients"})
    tracker.finish(exit_code=0 if summary["status"] == "completed" else 1)
