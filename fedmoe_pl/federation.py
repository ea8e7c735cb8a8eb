"""The round loop: sample -> local fits -> uploads -> aggregate -> broadcast -> evaluate -> log -> checkpoint."""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from tqdm.auto import tqdm

from fedmoe_pl.aggregation import Payload, payload_bytes, payload_numel
from fedmoe_pl.algorithms.base import Algorithm, ClientConfig, ClientContext, FederatedClient
from fedmoe_pl.data import FederatedDataModule
from fedmoe_pl.models import model_name
from fedmoe_pl.rundir import RunDirectory
from fedmoe_pl.tracking import WandbTracker

SAMPLING_STREAM, TRAINING_STREAM = 2, 3  # SeedSequence keys: independent random streams of a run


@dataclass
class FederationConfig:
    """The federation's schedule and where it writes.

    Args:
        rounds: communication rounds T (paper: 500).
        participation: C, the fraction of clients sampled each round, in (0, 1].
        local_epochs: local epochs per round (paper grid: 1 or 10).
        eval_every: evaluate every this many rounds (the last round is always evaluated).
        eval_clients: evaluate ``all`` clients or only the round's ``sampled`` ones.
        run_dir: the run directory.
    """

    rounds: int = 5
    participation: float = 1.0
    local_epochs: int = 1
    eval_every: int = 1
    eval_clients: Literal["all", "sampled"] = "all"
    run_dir: str = "runs/default"

    def __post_init__(self) -> None:
        if self.rounds <= 0:
            raise ValueError(f"federation.rounds must be a positive number of rounds, got {self.rounds}")
        if not 0 < self.participation <= 1:
            raise ValueError(f"federation.participation (C) must lie in (0, 1], got {self.participation}")
        if self.local_epochs <= 0 or self.eval_every <= 0:
            raise ValueError(
                f"federation.local_epochs ({self.local_epochs}) and eval_every ({self.eval_every}) must be positive"
            )


def clients_per_round(participation: float, num_clients: int) -> int:
    return max(1, math.ceil(round(participation * num_clients, 9)))


def sample_clients(seed: int, round_: int, num_clients: int, per_round: int) -> list[int]:
    """The clients of one round: a pure function of (seed, round), the same for every method."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, SAMPLING_STREAM, round_]))
    return sorted(rng.choice(num_clients, per_round, replace=False).tolist())


def fit_seed(seed: int, round_: int, client: int) -> int:
    """Seed of one local fit's shuffling and augmentation."""
    return int(np.random.SeedSequence([seed, TRAINING_STREAM, round_, client]).generate_state(1)[0])


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
    ) -> None:
        self.cfg, self.data, self.algorithm, self.seed = cfg, data, algorithm, seed
        self.trainer_kwargs = dict(trainer_kwargs or {})
        self.tracker = tracker
        self.run_dir = RunDirectory(cfg.run_dir)
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
        self.totals = {"bytes_up": 0, "bytes_down": 0, "wall_s": 0.0}
        self.shared_numel = [0] * data.num_clients  # elements of each client's last upload
        self.meta: dict[str, Any] = {}  # stored with every checkpoint by the caller
        quiet_lightning()

    # -- one round --------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """Train the remaining rounds; return the metric records of the evaluated ones."""
        records = []
        bar = tqdm(range(self.round + 1, self.cfg.rounds + 1), desc="rounds", unit="round", dynamic_ncols=True)
        for rnd in bar:
            start = time.perf_counter()
            sampled = self.schedule[rnd - 1]
            bytes_down = self._send_global(sampled)
            uploads, weights, losses = [], [], []
            for k in sampled:
                losses.append(self._local_fit(k, rnd))
                uploads.append(self.clients[k].upload())
                self.shared_numel[k] = payload_numel(uploads[-1])
                weights.append(self.data.clients[k].num_train)
            bytes_up = sum(payload_bytes(u) for u in uploads)
            self.global_payload = self.algorithm.aggregate(uploads, weights, self.global_payload)
            self.version += 1
            bytes_down += self._send_global(sampled)
            record: dict[str, Any] = {"round": rnd, "train_loss": float(np.mean(losses))}
            if rnd % self.cfg.eval_every == 0 or rnd == self.cfg.rounds:
                record.update(self._evaluate(sampled))
                bar.set_postfix(mean_acc=f"{record['mean_acc']:.4f}")
            self.round = rnd
            self.totals["bytes_up"] += bytes_up
            self.totals["bytes_down"] += bytes_down
            self.totals["wall_s"] += time.perf_counter() - start
            record.update(
                bytes_up=bytes_up,
                bytes_down=bytes_down,
                total_bytes_up=self.totals["bytes_up"],
                total_bytes_down=self.totals["bytes_down"],
                wall_s=time.perf_counter() - start,
            )
            self._log(record)
            if "mean_acc" in record:
                records.append(record)
            self.run_dir.save_checkpoint(self.state_dict())
        return records

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
        ids = range(len(self.clients)) if self.cfg.eval_clients == "all" else sampled
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
        if self.tracker is None:
            return
        flat = {k: v for k, v in record.items() if not isinstance(v, dict) and k != "round"}
        per_client = {k: v for k, v in record.items() if isinstance(v, dict)}
        for key, values in per_client.items():
            flat.update({f"{key}/{k}": v for k, v in values.items()})
        tables = {}
        if per_client:
            columns = ["client", "model", *per_client]
            ids = sorted(per_client["client_acc"], key=int)
            rows = [[int(k), self.model_names[int(k)], *(per_client[c].get(k) for c in per_client)] for k in ids]
            tables["clients"] = (columns, rows)
        self.tracker.log(flat, step=record["round"], tables=tables)

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
        self.totals = dict(state["totals"])
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
