"""One experiment from configuration to summary: the body of ``fedmoe-pl fit``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from fedmoe_pl.algorithms import Algorithm, ClientConfig
from fedmoe_pl.clients import ClientPool, DiskClients, MemoryClients
from fedmoe_pl.data import FederatedDataModule
from fedmoe_pl.evaluation import Evaluator
from fedmoe_pl.executor import SequentialExecutor
from fedmoe_pl.federation import Federation, FederationConfig
from fedmoe_pl.rundir import RunDirectory
from fedmoe_pl.signals import StopSignals
from fedmoe_pl.sinks import Checkpoint, MetricsFile, Plots, ProgressBar, Sink, SummaryFile, Wandb
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


def training_device(trainer: dict[str, Any]) -> torch.device:
    """The device the local fits will use, resolved once by Lightning from the Trainer settings.

    Building a throwaway Trainer also refuses an accelerator this machine lacks before anything
    is written.
    """
    try:
        probe = L.Trainer(**trainer, devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
        return probe.strategy.root_device
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
    device = training_device(exp.trainer)
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
        return _train(exp, run_dir, checkpoint, wanted, device)
    finally:
        run_dir.release()


def client_pool(cfg: FederationConfig) -> ClientPool:
    """The store ``federation.client_store`` names."""
    if cfg.client_store == "disk":
        return DiskClients(cfg.client_store_dir or Path(cfg.run_dir) / "clients")
    return MemoryClients()


def build_federation(exp: Experiment, sinks: Sequence[Sink] = (), device: Any = "cpu") -> Federation:
    """The experiment's federation: one Trainer per client in turn, evaluated on ``device``."""
    executor = SequentialExecutor(exp.trainer)
    return Federation(
        exp.federation,
        exp.data,
        exp.client,
        exp.algorithm,
        exp.seed,
        executor,
        Evaluator(device),
        sinks,
        client_pool(exp.federation),
    )


def _train(
    exp: Experiment, run_dir: RunDirectory, checkpoint: dict[str, Any] | None, wanted: dict[str, Any], device: Any
) -> dict[str, Any]:
    run_dir.write_text("config.yaml", exp.config_yaml)
    partition = exp.data.report()
    run_dir.write_json("partition.json", partition)
    tracker = WandbTracker(exp.wandb, run_dir.path, exp.config, checkpoint["meta"]["wandb_id"] if checkpoint else None)
    classes = range(partition["num_classes"])
    table = (
        ["client", *partition["classes"]],
        [[c["id"], *(c["train"].get(str(label), 0) for label in classes)] for c in partition["clients"]],
    )
    meta = {"result_config": wanted, "fingerprint": exp.data.fingerprint, "wandb_id": tracker.run_id}
    sinks = [
        MetricsFile(run_dir),
        Checkpoint(run_dir, meta),
        Wandb(tracker, table),
        ProgressBar(),
        SummaryFile(run_dir),
        Plots(run_dir),
    ]
    fed = build_federation(exp, sinks, device)
    if checkpoint is not None:
        fed.load_state_dict(checkpoint)
    with StopSignals() as signals:
        return fed.run(signals)
