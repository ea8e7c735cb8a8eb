"""One experiment from configuration to summary: the body of ``fedmoe-pl fit``."""

from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import lightning as L
import torch
from filelock import FileLock, Timeout

from fedmoe_pl.algorithms import Algorithm, ClientConfig
from fedmoe_pl.analysis.evaluation import Evaluator
from fedmoe_pl.analysis.results import CostConfig
from fedmoe_pl.cluster.sweep import SweepRun
from fedmoe_pl.data import FederatedDataModule
from fedmoe_pl.errors import RunError
from fedmoe_pl.fleets import rank_watch
from fedmoe_pl.fleets.batched import BatchedExecutor
from fedmoe_pl.fleets.clients import ClientPool, DiskClients, MemoryClients, damaged_files
from fedmoe_pl.fleets.distributed import DistributedExecutor, ProcessGroup, SingleProcessEnvironment
from fedmoe_pl.fleets.executor import Executor, SequentialExecutor
from fedmoe_pl.fleets.in_process import InProcessFleet
from fedmoe_pl.models import check_model_kind
from fedmoe_pl.run.federation import Federation, FederationConfig
from fedmoe_pl.run.rundir import CONFIG, PARTITION, PREVIOUS_CHECKPOINT, SUMMARY, RunDirectory
from fedmoe_pl.run.signals import AGENT_STOPS, StopSignals
from fedmoe_pl.run.sinks import Checkpoint, LightningLoggers, MetricsFile, Plots, ProgressBar, Sink, SummaryFile, Wandb
from fedmoe_pl.run.tracking import WandbConfig, WandbTracker
from fedmoe_pl.run.trainer_settings import FEDERATION_OWNED, batched_refusals, check_batched, lightning_kwargs

log = logging.getLogger(__name__)
T = TypeVar("T")

# Config keys that may change between a run and its resumption without changing its results.
RESUMABLE_KEYS = (
    "federation.rounds",
    "federation.run_dir",
    "federation.eval_every",
    "federation.eval_clients",
    "federation.on_client_error",
    "federation.client_store",
    "federation.max_empty_rounds",
    "wandb",
    "loggers",
    "cost",
    "trainer.accelerator",  # the others (precision, clipping, ...) change results
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
    cost: CostConfig | None = None  # the summary's cost as time
    loggers: list[Any] = field(default_factory=list)  # Lightning loggers besides W&B
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


# Defaults that changed their spelling, not the run: (key, the value runs recorded, the new default).
# The shared model became "the data's smallest" (null) when inputs other than images arrived; every
# run from before was on images, where that is CNN-5.
RESPELLED_DEFAULTS = (
    ("algorithm.init_args.global_expert", "cnn5", None),
    ("algorithm.init_args.shared_model", "cnn5", None),
)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    # Runs from before the trainer settings were compared did not record them.
    keys = sorted(k for k in set(saved) | set(current) if k in saved or not k.startswith("trainer."))
    same = {spelling for key, old, new in RESPELLED_DEFAULTS for spelling in ((key, old, new), (key, new, old))}
    return [
        f"{k}: {saved.get(k)!r} in the run, {current.get(k)!r} now"
        for k in keys
        if saved.get(k) != current.get(k) and (k, saved.get(k), current.get(k)) not in same
    ]


def training_device(trainer: dict[str, Any], plugins: Sequence[Any] = ()) -> torch.device:
    """The device the local fits will use, resolved once by Lightning from the Trainer settings.

    Building a throwaway Trainer also refuses an accelerator this machine lacks before anything
    is written.
    """
    try:
        probe = L.Trainer(**lightning_kwargs(trainer), devices=1, plugins=list(plugins), **FEDERATION_OWNED)
        return probe.strategy.root_device
    except Exception as err:
        raise ValueError(
            f"the trainer settings {trainer} cannot run on this machine: {err}. "
            "Use --trainer.accelerator auto (a GPU when there is one, else the CPU) or cpu"
        ) from err


BuildFederation = Callable[[Experiment, Sequence[Sink], Any, ProcessGroup | None], Federation]


def fit(exp: Experiment, resume: str | None = None, build: BuildFederation | None = None) -> dict[str, Any]:
    """Train (or resume) the federation; write the run directory; return the summary.

    Everything that can refuse the command is checked before the run directory is touched.
    Launched as several processes (``torchrun``, ``srun -n K``), the ranks share every round's
    training (:mod:`fedmoe_pl.fleets.distributed`) and only rank 0 writes. ``build`` replaces
    :func:`build_federation` (the Flower ServerApp's federation trains its clients elsewhere).
    """
    group = ProcessGroup.from_env()
    if group is None:
        return _fit(exp, resume, None, training_device(exp.trainer), build or build_federation)
    if build is not None:
        raise ValueError("a federation of remote clients runs in one process, not under torchrun or srun -n K")
    device = training_device(exp.trainer, [SingleProcessEnvironment()])
    if device.type == "cuda":
        device = torch.device("cuda", group.cuda_index())
    watch = group.start(use_cuda=device.type == "cuda", rendezvous_dir=Path(exp.federation.run_dir).resolve().parent)
    try:
        summary = _fit(exp, resume, group, device, build_federation)
    except Exception as err:  # every other rank must stop too, not wait in the next collective
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        print(f"fedmoe-pl fit: error: rank {group.rank} failed: {reason}; every rank stops", file=sys.stderr)
        watch.report(reason)
        watch.stop()
        raise
    except BaseException:
        watch.stop()
        raise
    else:
        watch.finish()
        return summary
    finally:
        group.stop()


def _fit(
    exp: Experiment, resume: str | None, group: ProcessGroup | None, device: torch.device, build: BuildFederation
) -> dict[str, Any]:
    agree = group.agree if group is not None else _call
    run_dir = RunDirectory(exp.federation.run_dir)
    checkpoint, wanted = agree(lambda: _checks(exp, resume, run_dir))
    if group is not None and not group.leader:
        return _train(exp, None, checkpoint, wanted, device, group, build)
    run_dir.acquire()
    store_lock = None
    try:
        if resume is None and run_dir.holds_run():  # a run that started meanwhile, before the lock
            raise ValueError(f"run directory {str(run_dir.path)!r} already holds a run started by another process")
        store_lock = _lock_store(exp.federation)
        return _train(exp, run_dir, checkpoint, wanted, device, group, build)
    finally:
        if store_lock is not None:
            store_lock.release()
        run_dir.release()


def _call(check: Callable[[], T]) -> T:
    return check()


def _checks(exp: Experiment, resume: str | None, run_dir: RunDirectory) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Refuse what cannot run, load the data and the checkpoint to resume: before anything is written."""
    exp.algorithm.check(exp.client)
    exp.algorithm.check_federation(exp.federation)
    exp.data.check_rounds(exp.federation.rounds)
    if exp.federation.executor == "batched":
        check_batched(exp.trainer)
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
        checkpoint = _intact_checkpoint(resume, checkpoint, store_directory(exp.federation))  # type: ignore[arg-type]
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
    if exp.data.inputs is not None:  # every model can read the data's inputs
        for spec in exp.client.zoo:
            check_model_kind(spec, exp.data.inputs, "client.zoo")
        for name, spec in exp.algorithm.model_specs().items():
            check_model_kind(spec, exp.data.inputs, f"algorithm.init_args.{name}")
    if checkpoint is not None and checkpoint["meta"]["fingerprint"] != exp.data.fingerprint:
        raise ValueError(
            f"refusing to resume: the partition fingerprint is {exp.data.fingerprint} but the run used "
            f"{checkpoint['meta']['fingerprint']}; the data on disk differs from the run's"
        )
    return checkpoint, wanted


def _intact_checkpoint(resume: str, checkpoint: dict[str, Any], directory: Path) -> dict[str, Any]:
    """The checkpoint to resume from: ``checkpoint`` if every client file it names is whole, else the
    previous one if its files are (a crash or power loss after the last one was written)."""
    damaged = damaged_files(checkpoint["clients"], directory)
    if not damaged:
        return checkpoint
    previous = RunDirectory.locate(resume) / PREVIOUS_CHECKPOINT
    if previous.exists() and Path(resume).resolve() != previous.resolve():
        earlier = RunDirectory.load_checkpoint(previous)
        if not damaged_files(earlier["clients"], directory):
            log.warning(
                "the last checkpoint (round %d) names client files that are missing or damaged (%s); resuming "
                "from the previous checkpoint, round %d",
                checkpoint["round"],
                ", ".join(damaged[:3]),
                earlier["round"],
            )
            return earlier
    raise ValueError(
        f"refusing to resume: the checkpoint names client files that are missing or damaged: "
        f"{', '.join(damaged[:3])}{' ...' if len(damaged) > 3 else ''}, and no earlier checkpoint has whole ones. "
        "The client files must stay beside the checkpoint (federation.client_store_dir); start a new run"
    )


def store_directory(cfg: FederationConfig) -> Path:
    """Where a run keeps its client files: ``clients`` in the run directory, or a folder of its own
    in ``client_store_dir``, named after the run directory, so that runs sharing a store (the cells
    of a grid) never touch each other's files."""
    if cfg.client_store_dir is None:
        return Path(cfg.run_dir) / "clients"
    run = Path(cfg.run_dir).resolve()
    return Path(cfg.client_store_dir) / f"{run.name}-{hashlib.sha1(str(run).encode()).hexdigest()[:10]}"


def client_pool(cfg: FederationConfig, group: ProcessGroup | None = None) -> ClientPool:
    """The store ``federation.client_store`` names, keeping its files in :func:`store_directory`.

    The other ranks of a multi-process run read what a resumed checkpoint names from rank 0's
    folder; with the disk store each keeps the clients it trains in a ``rank<k>`` folder there.
    """
    directory = store_directory(cfg)
    if group is not None and not group.leader:
        if cfg.client_store == "memory":
            return MemoryClients(None, fallback=directory)
        return DiskClients(directory / f"rank{group.rank}", fallback=directory)
    if cfg.client_store == "memory":
        return MemoryClients(directory)
    return DiskClients(directory)


def _lock_store(cfg: FederationConfig) -> FileLock | None:
    """Take a shared store's folder of this run for this process (the run directory's lock covers the default)."""
    if cfg.client_store_dir is None:
        return None
    folder = store_directory(cfg)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(folder / ".lock", timeout=0)
        lock.acquire()
    except Timeout:
        raise RunError(f"the client store {str(folder)!r} is in use by another running process") from None
    except OSError as err:
        raise ValueError(
            f"federation.client_store_dir {cfg.client_store_dir!r} cannot be written: {err.strerror or err}; "
            "fix its permissions or choose another folder"
        ) from err
    return lock


def uses_batched(executor: str, device: torch.device, trainer: dict[str, Any]) -> bool:
    """Whether ``federation.executor`` means the batched executor here: ``batched``, or ``auto`` on a GPU
    with Trainer settings the batched executor honours (else ``auto`` is the sequential executor)."""
    return executor == "batched" or (executor == "auto" and device.type == "cuda" and not batched_refusals(trainer))


def build_federation(
    exp: Experiment, sinks: Sequence[Sink] = (), device: Any = "cpu", group: ProcessGroup | None = None
) -> Federation:
    """The experiment's federation: one Trainer per client in turn (on this rank's share of every
    round in a multi-process run), evaluated on ``device`` (by rank 0 only)."""
    evaluator: Evaluator = Evaluator(device)
    if group is None:
        executor: Executor = SequentialExecutor(exp.trainer)
    else:
        gpu = torch.device(device).type == "cuda"
        executor = SequentialExecutor(exp.trainer, [SingleProcessEnvironment()], [group.cuda_index()] if gpu else 1)
        evaluator = Evaluator(device, enabled=group.leader)
    if uses_batched(exp.federation.executor, torch.device(device), exp.trainer):
        executor = BatchedExecutor(device, executor, exp.trainer, batched_group=exp.federation.batched_group)
    if group is not None:
        executor = DistributedExecutor(executor, group)
    pool = client_pool(exp.federation, group)
    fleet = InProcessFleet(exp.data, exp.client, exp.algorithm, exp.seed, executor, evaluator, pool)
    return Federation(exp.federation, exp.algorithm, fleet, exp.seed, sinks)


def _train(
    exp: Experiment,
    run_dir: RunDirectory | None,
    checkpoint: dict[str, Any] | None,
    wanted: dict[str, Any],
    device: Any,
    group: ProcessGroup | None,
    build: BuildFederation,
) -> dict[str, Any]:
    """Run the federation; ``run_dir`` None: a rank that writes nothing."""
    if run_dir is None:
        fed = build(exp, (), device, group)
        if checkpoint is not None:
            fed.load_state_dict(checkpoint)
        with stop_signals() as signals:
            return fed.run(signals)
    run_dir.write_text(CONFIG, exp.config_yaml)
    partition = exp.data.report()
    run_dir.write_json(PARTITION, partition)
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
        SummaryFile(run_dir, exp.cost),
        Plots(run_dir),
        *([LightningLoggers(exp.loggers, exp.config)] if exp.loggers else []),
    ]
    fed = build(exp, sinks, device, group)
    if checkpoint is not None:
        fed.load_state_dict(checkpoint)
    if (watch := rank_watch.active()) is not None:  # another rank failed: the summary says so
        watch.hooks.append(lambda reason: run_dir.write_json(SUMMARY, fed.summary("failed", reason)))
    with stop_signals() as signals:
        return fed.run(signals)


def stop_signals() -> StopSignals:
    """Under a W&B sweep agent, SIGTERM and SIGINT are the agent's stop: the run ends as ``stopped``."""
    return StopSignals(final=AGENT_STOPS if SweepRun.from_env() is not None else ())
