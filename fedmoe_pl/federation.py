"""The round loop: sample -> local fits -> uploads -> aggregate -> broadcast -> evaluate -> log -> checkpoint."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import random
import time
import warnings
from typing import Any

import lightning as L
import numpy as np
import torch
from tqdm.auto import tqdm

from fedmoe_pl.aggregation import Payload, payload_bytes, payload_numel
from fedmoe_pl.algorithms.base import Algorithm, ClientConfig, ClientContext, FederatedClient
from fedmoe_pl.data import FederatedDataModule
from fedmoe_pl.errors import ClientFailure
from fedmoe_pl.models import model_name
from fedmoe_pl.rundir import RunDirectory
from fedmoe_pl.schedule import FederationConfig, clients_per_round, dropped_clients, fit_seed, sample_clients
from fedmoe_pl.signals import StopSignals
from fedmoe_pl.tracking import WandbTracker

log = logging.getLogger(__name__)

__all__ = ["Federation", "FederationConfig", "clients_per_round", "quiet_lightning", "sample_clients"]


def quiet_lightning() -> None:
    """Per-client Trainers are an implementation detail: silence their banners and tips."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


class Federation:
    """Runs one experiment. Knows nothing about any particular method: see :class:`Algorithm`."""

    def __init__(
        self,
        cfg: FederationConfig,
        data: FederatedDataModule,
        client_cfg: ClientConfig,
        algorithm: Algorithm,
        seed: int,
        trainer_kwargs: dict[str, Any] | None = None,
        tracker: WandbTracker | None = None,
        run_dir: RunDirectory | None = None,
    ) -> None:
        self.cfg, self.data, self.algorithm, self.seed = cfg, data, algorithm, seed
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.tracker = tracker
        self.run_dir = run_dir or RunDirectory(cfg.run_dir)
        self.clients: list[FederatedClient] = [
            algorithm.build_client(
                ClientContext(
                    k, client_cfg.model_for(k), data.in_channels, data.image_size, data.num_classes, client_cfg
                )
            )
            for k in range(data.num_clients)
        ]
        self.model_names = [model_name(client_cfg.model_for(k)) for k in range(data.num_clients)]
        per_round = clients_per_round(cfg.participation, data.num_clients)
        self.schedule = [sample_clients(seed, r, data.num_clients, per_round) for r in range(1, cfg.rounds + 1)]
        self.global_payload: Payload = algorithm.initial_global(self.clients)
        self.version = 0  # bumped at every aggregation
        self.held_version = [-1] * data.num_clients  # which global each client holds; -1: none yet
        self.round = 0
        self.totals = {"bytes_up": 0, "bytes_down": 0, "wall_s": 0.0, "dropped": 0, "failed": 0}
        self.shared_numel = [0] * data.num_clients  # elements of each client's last upload
        self.meta: dict[str, Any] = {}  # stored with every checkpoint by the caller
        self.tested = [k for k in range(data.num_clients) if data.clients[k].num_test > 0]
        if len(self.tested) < data.num_clients:
            untested = sorted(set(range(data.num_clients)) - set(self.tested))
            log.warning("clients %s have no test samples; they are left out of every accuracy mean", untested)
        quiet_lightning()

    # -- one round --------------------------------------------------------------------------

    def run(self, signals: StopSignals | None = None) -> list[dict[str, Any]]:
        """Train the remaining rounds; return the metric records of the evaluated ones.

        With ``signals``, a stop signal abandons the round in progress (it is redone on resume) and
        raises :class:`~fedmoe_pl.errors.Interrupted` once the last checkpoint is complete.
        """
        records = []
        bar = tqdm(range(self.round + 1, self.cfg.rounds + 1), desc="rounds", unit="round", dynamic_ncols=True)
        for rnd in bar:
            start = time.perf_counter()
            with signals.abandonable() if signals else contextlib.nullcontext():
                record = self._round(rnd)
            self.round = rnd
            self.totals["bytes_up"] += record["bytes_up"]
            self.totals["bytes_down"] += record["bytes_down"]
            self.totals["dropped"] += len(record["dropped"])
            self.totals["failed"] += len(record["failed"])
            self.totals["wall_s"] += time.perf_counter() - start
            record.update(
                total_bytes_up=self.totals["bytes_up"],
                total_bytes_down=self.totals["bytes_down"],
                total_dropped=self.totals["dropped"],
                total_failed=self.totals["failed"],
                wall_s=time.perf_counter() - start,
            )
            if record.get("mean_acc") is not None:
                bar.set_postfix(mean_acc=f"{record['mean_acc']:.4f}")
                records.append(record)
            self._log(record)
            self.run_dir.save_checkpoint(self.state_dict())
            if signals and rnd < self.cfg.rounds:
                signals.check()
        return records

    def _round(self, rnd: int) -> dict[str, Any]:
        sampled = self.schedule[rnd - 1]
        offline = dropped_clients(self.seed, rnd, sampled, self.cfg.dropout)
        reporting = [k for k in sampled if k not in offline]
        bytes_down = self._send_global(reporting)
        uploads, weights, losses, reported, failed = [], [], [], [], []
        for k in reporting:
            loss = self._guarded_fit(k, rnd)
            if loss is None:
                failed.append(k)
                continue
            losses.append(loss)
            uploads.append(self.clients[k].upload())
            self.shared_numel[k] = payload_numel(uploads[-1])
            weights.append(self.data.clients[k].num_train)
            reported.append(k)
        if uploads:  # nobody reported: the server keeps its state
            self.global_payload = self.algorithm.aggregate(uploads, weights, self.global_payload)
            self.version += 1
            bytes_down += self._send_global(reported)
        record: dict[str, Any] = {
            "round": rnd,
            "train_loss": float(np.mean(losses)) if losses else None,
            "reported": len(reported),
            "dropped": sorted(offline),
            "failed": failed,
            "bytes_up": sum(payload_bytes(u) for u in uploads),
            "bytes_down": bytes_down,
        }
        if rnd % self.cfg.eval_every == 0 or rnd == self.cfg.rounds:
            record.update(self._evaluate(sampled))
        return record

    def _guarded_fit(self, k: int, rnd: int) -> float | None:
        """Client ``k``'s local fit and its mean loss; ``None`` if it failed and is dropped."""
        before = copy.deepcopy(self.clients[k].state_dict()) if self.cfg.on_client_error == "drop" else None
        try:
            loss = self._local_fit(k, rnd)
            if not math.isfinite(loss):
                raise FloatingPointError(f"the training loss is {loss}; lower client.lr or check the data")
        except Exception as err:
            if before is None:
                raise ClientFailure(k, rnd, err) from err
            log.warning("round %d: client %d dropped: %s: %s", rnd, k, type(err).__name__, err)
            self.clients[k].load_state_dict(before)
            return None
        return loss

    def _send_global(self, ids: list[int]) -> int:
        """Bring the listed clients up to the server's current global state; return bytes sent."""
        sent = 0
        for k in ids:
            if self.held_version[k] != self.version:
                self.clients[k].download(self.global_payload)
                self.held_version[k] = self.version
                sent += payload_bytes(self.global_payload)
        return sent

    def _local_fit(self, k: int, rnd: int) -> float:
        datamodule = self.data.clients[k]
        datamodule.shuffle_seed = fit_seed(self.seed, rnd, k)
        trainer = L.Trainer(
            **self.trainer_kwargs,
            devices=1,
            max_epochs=self.cfg.local_epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        trainer.fit(self.clients[k], datamodule=datamodule)
        return self.clients[k].train_loss

    def _eval_device(self) -> torch.device:
        wants_gpu = self.trainer_kwargs.get("accelerator", "auto") in ("gpu", "cuda", "auto")
        return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")

    def _evaluate(self, sampled: list[int]) -> dict[str, Any]:
        ids = [k for k in (self.tested if self.cfg.eval_clients == "all" else sampled) if k in self.tested]
        if not ids:
            return {"mean_acc": None}
        device = self._eval_device()
        results: dict[int, dict[str, float]] = {}
        for k in ids:
            client = self.clients[k].to(device)
            results[k] = client.evaluate(self.data.clients[k].eval_batches(device))
            client.to("cpu")
        accs = np.array([results[k]["acc"] for k in ids])
        sizes = np.array([self.data.clients[k].num_test for k in ids])
        out: dict[str, Any] = {
            "mean_acc": float(accs.mean()),
            "weighted_acc": float((accs * sizes).sum() / sizes.sum()),
            "std_acc": float(accs.std()),
            "min_acc": float(accs.min()),
            "client_acc": {str(k): results[k]["acc"] for k in ids},
        }
        extras = {key for r in results.values() for key in r if key != "acc"}
        for key in sorted(extras):
            out[f"client_{key}"] = {str(k): results[k][key] for k in ids if key in results[k]}
        return out

    def _log(self, record: dict[str, Any]) -> None:
        if "mean_acc" in record:
            self.run_dir.append_metrics(record)
        if self.tracker is not None:
            self.tracker.log_round(record, self.model_names)

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "version": self.version,
            "held_version": list(self.held_version),
            "global": self.global_payload,
            "clients": [c.state_dict() for c in self.clients],
            "schedule": self.schedule,
            "meta": self.meta,
            "totals": dict(self.totals),
            "shared_numel": list(self.shared_numel),
            "rng": {
                "torch": torch.get_rng_state(),
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        done = state["round"]
        if state["schedule"][:done] != self.schedule[:done]:
            raise ValueError("the checkpoint's client sampling differs from this config's; resume refused")
        self.round, self.version = done, state["version"]
        self.held_version = list(state["held_version"])
        self.global_payload = state["global"]
        for client, client_state in zip(self.clients, state["clients"]):
            client.load_state_dict(client_state)
        self.totals = {"dropped": 0, "failed": 0, **state["totals"]}
        self.shared_numel = list(state["shared_numel"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])

    def client_table(self, final: dict[str, Any] | None) -> list[dict[str, Any]]:
        accs = (final or {}).get("client_acc", {})
        return [
            {
                "id": k,
                "model": self.model_names[k],
                "params_total": sum(p.numel() for p in client.parameters()),
                "params_shared": self.shared_numel[k],
                "train_samples": self.data.clients[k].num_train,
                "test_samples": self.data.clients[k].num_test,
                "final_acc": accs.get(str(k)),
            }
            for k, client in enumerate(self.clients)
        ]
