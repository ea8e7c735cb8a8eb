"""Executors: who trains a round's cohort of clients, and how.

The loop hands an executor the round's jobs and reads back one outcome per client. The one
shipped here is the reference path of the design: a LightningModule per client and a fresh
``Trainer.fit`` per client, one after another. Faster or distributed executors (a batched GPU
engine, several processes) plug in at the same seam.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment

from fedmoe_pl.algorithms import ClientResult, FederatedClient
from fedmoe_pl.data import ClientDataModule
from fedmoe_pl.fleets.fleet import FitOutcome, diverged
from fedmoe_pl.run.trainer_settings import FEDERATION_OWNED, StepRules, lightning_kwargs


@dataclass
class FitJob:
    """One client's local fit in one round."""

    client: FederatedClient
    data: ClientDataModule
    seed: int  # shuffling and augmentation of this fit
    epochs: int
    restore_on_error: bool = False  # put the client's state back if the fit fails


__all__ = ["Executor", "FitJob", "FitOutcome", "SequentialExecutor", "diverged", "quiet_lightning"]


def quiet_lightning() -> None:
    """Per-client Trainers are an implementation detail: silence their banners and tips (entry points call this)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    # Slurm's tools on PATH outside a job: a run there is a single process, nothing to launch with srun.
    warnings.filterwarnings("ignore", message=".*The `srun` command is available on your system but is not used.*")


class Executor(Protocol):
    """Trains a round's cohort of clients, inside a fleet (:class:`~fedmoe_pl.fleets.in_process.InProcessFleet`)."""

    def fit(self, jobs: Sequence[FitJob]) -> Iterator[FitOutcome]:
        """Train every job's client; yield one outcome per job, in order."""
        ...

    def round_stats(self) -> dict[str, Any]:
        """What the executor measured of its last ``fit``, for the round's record (the multi-process
        executor: the training samples of each rank); empty when nothing."""
        ...


class SequentialExecutor:
    """A fresh Lightning ``Trainer`` and ``Trainer.fit`` per client, one client after another.

    Args:
        trainer_kwargs: the user's ``trainer`` settings (:class:`~fedmoe_pl.run.trainer_settings.TrainerSettings`);
            clipping and accumulation go to the client's step, the rest to the Trainer. The executor
            sets the arguments a local fit owns (one device, the epochs, no logging or checkpoints).
        plugins: the Trainers' plugins (default: under Slurm, its environment without auto-requeue).
        devices: the Trainers' ``devices`` (one device; a list picks which GPU).
    """

    def __init__(
        self,
        trainer_kwargs: dict[str, Any] | None = None,
        plugins: list[Any] | None = None,
        devices: int | list[int] = 1,
    ) -> None:
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.step_rules = StepRules.from_trainer(self.trainer_kwargs)
        self._lightning_kwargs = lightning_kwargs(self.trainer_kwargs)
        self.devices = devices
        # Under Slurm, Lightning would save and requeue a single local fit on SIGUSR1; the
        # federation keeps its own checkpoints and requeues itself (fedmoe_pl.cluster.slurm).
        if plugins is None:
            plugins = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []
        self.plugins = plugins

    def fit(self, jobs: Sequence[FitJob]) -> Iterator[FitOutcome]:
        for job in jobs:
            client_id = job.client.client_id
            before = copy.deepcopy(job.client.state_dict()) if job.restore_on_error else None
            try:
                loss = self._fit_one(job)
                if (error := diverged(loss)) is not None:
                    raise error
            except Exception as err:
                if before is not None:
                    job.client.load_state_dict(before)
                yield FitOutcome(client_id, error=err)
                continue
            result = ClientResult(client_id, job.client.upload(), job.data.num_train, {"train_loss": loss})
            yield FitOutcome(client_id, result=result)

    def round_stats(self) -> dict[str, Any]:
        return {}

    def _fit_one(self, job: FitJob) -> float:
        job.data.shuffle_seed = job.seed
        job.client.step_rules = self.step_rules
        trainer = L.Trainer(
            **self._lightning_kwargs,
            devices=self.devices,
            max_epochs=job.epochs,
            plugins=self.plugins,
            **FEDERATION_OWNED,
        )
        job.data.keep_on(trainer.strategy.root_device)  # on a GPU: the shard stays there, batches are slices
        # A model that draws random numbers while training (dropout) draws them from the fit's own
        # seed, not from a stream shared by every fit: a resumed run needs no saved random state.
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        try:
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(job.seed)
                trainer.fit(job.client, datamodule=job.data)
        finally:
            # Lightning leaves the Trainer on the module and on the shard, and the last step's
            # gradients on the parameters; the shard lives for the whole run, so the Trainer (and
            # through it the client, its optimizer's momentum and gradients) would outlive the
            # client's round: a disk store's client would never leave memory.
            job.data.trainer = None
            job.client.trainer = None  # type: ignore[assignment]
            for param in job.client.parameters():
                param.grad = None
        return job.client.train_loss
