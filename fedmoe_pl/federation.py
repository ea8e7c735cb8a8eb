"""The round loop: sample -> configure -> local fits -> aggregate -> evaluate -> sinks.

    config -> data -> Algorithm.configure(round, ids) -> Executor.fit(cohort)
           -> Algorithm.aggregate(round, results) -> Evaluator -> sinks

The loop knows no method (see :class:`~fedmoe_pl.algorithms.Algorithm`), no trainer (see
:mod:`fedmoe_pl.executor`) and no file (see :mod:`fedmoe_pl.sinks`).
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from fedmoe_pl.aggregation import payload_bytes, payload_numel
from fedmoe_pl.algorithms import (
    Algorithm,
    ClientConfig,
    ClientContext,
    ClientResult,
    FederatedClient,
    Instruction,
)
from fedmoe_pl.clients import ClientPool, MemoryClients, ReadOnlyClients
from fedmoe_pl.data import FederatedDataModule
from fedmoe_pl.errors import ClientFailure, ClientUnreachable, Interrupted, RunError
from fedmoe_pl.evaluation import Evaluator
from fedmoe_pl.executor import Executor, FitJob, SequentialExecutor
from fedmoe_pl.flops import training_flops_per_sample
from fedmoe_pl.models import model_name
from fedmoe_pl.schedule import FederationConfig, clients_per_round, dropped_clients, fit_seed, sample_clients
from fedmoe_pl.signals import StopSignals
from fedmoe_pl.sinks import Sink

log = logging.getLogger(__name__)

__all__ = ["Federation", "FederationConfig", "client_builder", "clients_per_round", "quiet_lightning", "sample_clients"]

CHECKPOINT_FORMAT = 2  # bumped when the checkpoint's layout changes


def quiet_lightning() -> None:
    """Per-client Trainers are an implementation detail: silence their banners and tips (entry points call this)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    # Slurm's tools on PATH outside a job: a run there is a single process, nothing to launch with srun.
    warnings.filterwarnings("ignore", message=".*The `srun` command is available on your system but is not used.*")


def client_builder(
    algorithm: Algorithm, client_cfg: ClientConfig, data: FederatedDataModule
) -> Callable[[int], FederatedClient]:
    """Builds client ``cid`` freshly initialized from the global random stream: clients ``0 .. N-1``,
    built in order after the run's seeding and ``data.setup``, get the same weights in every process."""
    dims = (data.in_channels, data.image_size, data.num_classes)
    return lambda cid: algorithm.build_client(ClientContext(cid, client_cfg.model_for(cid), *dims, client_cfg))


class Federation:
    """Runs one experiment's rounds.

    Args:
        cfg: rounds, participation, local epochs, evaluation, failure policy.
        data: the partitioned data (``setup`` already called).
        client_cfg: the model zoo and SGD settings of every client.
        algorithm: the method: its clients and its server.
        seed: the run's seed; every random stream derives from it.
        executor: trains a round's cohort (default: one Trainer per client, in turn).
        evaluator: scores every client on its test set (default: on the CPU).
        sinks: receive the run's events (metrics file, checkpoint, W&B, progress, summary).
        clients: where the clients live between rounds (default: all in memory).
    """

    def __init__(
        self,
        cfg: FederationConfig,
        data: FederatedDataModule,
        client_cfg: ClientConfig,
        algorithm: Algorithm,
        seed: int,
        executor: Executor | None = None,
        evaluator: Evaluator | None = None,
        sinks: Sequence[Sink] = (),
        clients: ClientPool | None = None,
    ) -> None:
        self.cfg, self.data, self.algorithm, self.seed = cfg, data, algorithm, seed
        self.executor = executor or SequentialExecutor()
        self.evaluator = evaluator or Evaluator()
        self.sinks = list(sinks)
        self.clients: ClientPool = MemoryClients() if clients is None else clients
        self.clients.populate(client_builder(algorithm, client_cfg, data), data.num_clients)
        self.model_names = [model_name(client_cfg.model_for(cid)) for cid in range(data.num_clients)]
        per_round = clients_per_round(cfg.participation, data.num_clients)
        self.schedule = [
            sample_clients(seed, round_, data.num_clients, per_round) for round_ in range(1, cfg.rounds + 1)
        ]
        algorithm.start(ReadOnlyClients(self.clients), seed, cfg.rounds)
        self.round = 0
        self.totals = {
            "bytes_up": 0,
            "bytes_down": 0,
            "train_flops": 0,
            "wall_s": 0.0,
            "dropped": 0,
            "failed": 0,
            "reported": 0,
        }
        self.empty_streak = 0  # consecutive rounds, up to the last one, in which no client reported
        self._flops_per_sample: dict[str, float] = {}  # by model name: clients of one architecture cost the same
        self.shared_numel = [0] * data.num_clients  # elements of each client's last upload
        self.final: dict[str, Any] | None = None  # the last evaluated round's record
        self.best: dict[str, Any] | None = None  # the evaluated round with the best mean accuracy
        untested = [cid for cid, shard in enumerate(data.clients) if shard.num_test == 0]
        if untested:
            log.warning("clients %s have no test samples; they are left out of every accuracy mean", untested)

    # -- the loop -----------------------------------------------------------------------------

    def run(self, signals: StopSignals | None = None) -> dict[str, Any]:
        """Train the remaining rounds and return the summary; sinks see every event.

        A stop signal abandons the round in progress (it is redone on resume) and raises
        :class:`~fedmoe_pl.errors.Interrupted` once the sinks have saved the last complete round.
        """
        status, reason = "failed", None
        try:
            for sink in self.sinks:
                sink.on_run_start(self)
            for round_ in range(self.round + 1, self.cfg.rounds + 1):
                start = time.perf_counter()
                with signals.abandonable() if signals else contextlib.nullcontext():
                    record = self._round(round_)
                self._account(round_, record, time.perf_counter() - start)
                for sink in self.sinks:
                    sink.on_round_end(self, record)
                self._check_progress()
                if signals and round_ < self.cfg.rounds:
                    signals.check()
            if self.totals["reported"] == 0:
                raise RunError(
                    f"no client reported in any of the run's {self.round} rounds: nothing was trained. "
                    "metrics.jsonl lists the failed and dropped clients of each round; fix the cause and start again"
                )
            status = "completed"
        except Interrupted as stop:
            stop.round, reason = self.round, stop.name
            status = "stopped" if stop.final else "interrupted"
            raise
        except BaseException as err:
            reason = f"{type(err).__name__}: {err}"
            raise
        finally:
            summary = self.summary(status, reason)
            for sink in self.sinks:
                sink.on_run_end(self, summary)
        return summary

    def _check_progress(self) -> None:
        """Stop a run that keeps training nobody (every client failing, offline or unreachable)."""
        if self.empty_streak >= self.cfg.max_empty_rounds:
            first = self.round - self.empty_streak + 1
            raise RunError(
                f"no client reported in {self.empty_streak} consecutive rounds ({first}-{self.round}; "
                f"federation.max_empty_rounds={self.cfg.max_empty_rounds}): the clients keep failing or are "
                "unreachable. metrics.jsonl lists them under failed and dropped; fix the cause and continue "
                "with --resume"
            )

    def _round(self, round_: int) -> dict[str, Any]:
        sampled = self.schedule[round_ - 1]
        offline = dropped_clients(self.seed, round_, sampled, self.cfg.dropout)
        reporting = [cid for cid in sampled if cid not in offline]
        bytes_down = self._deliver(self.algorithm.configure(round_, reporting))
        results: list[ClientResult] = []
        failed: list[int] = []
        for outcome in self.executor.fit([self._job(cid, round_) for cid in reporting]):
            if outcome.error is not None:
                if self.cfg.on_client_error == "stop" and not isinstance(outcome.error, ClientUnreachable):
                    raise ClientFailure(outcome.client_id, round_, outcome.error) from outcome.error
                log.warning("round %d: client %d dropped: %s", round_, outcome.client_id, outcome.error)
                failed.append(outcome.client_id)
            elif outcome.result is not None:
                results.append(outcome.result)
        bytes_down += self._deliver(self.algorithm.aggregate(round_, results))
        stats = getattr(self.executor, "round_stats", {})  # what an executor reports of its round, if anything
        losses = [r.metrics["train_loss"] for r in results]
        record: dict[str, Any] = {
            "round": round_,
            "train_loss": float(np.mean(losses)) if losses else None,
            "reported": len(results),
            "empty": not results,  # no client reported: nothing was aggregated this round
            "dropped": sorted(offline),
            "failed": failed,
            "bytes_up": sum(payload_bytes(r.upload) for r in results),
            "bytes_down": bytes_down,
            "train_flops": sum(self._training_flops(r) for r in results),
            **stats,
        }
        for r in results:
            self.shared_numel[r.client_id] = payload_numel(r.upload)
        if round_ % self.cfg.eval_every == 0 or round_ == self.cfg.rounds:
            ids = list(range(len(self.clients))) if self.cfg.eval_clients == "all" else sampled
            record.update(self._evaluate(ids, confusion=round_ == self.cfg.rounds))
        self._end_round(round_, record)
        return record

    # -- where the clients are: in this process (a federation whose clients live elsewhere, as
    # -- the Flower adapter's, overrides these three and brings its own executor) ------------------

    def _deliver(self, instructions: dict[int, Instruction]) -> int:
        """Apply the server's instructions to their clients; return the bytes of state sent."""
        sent = 0
        for client_id, instruction in instructions.items():
            client = self.clients[client_id]
            if instruction.payload is not None:
                client.download(instruction.payload)
                sent += payload_bytes(instruction.payload)
            client.configure_round(**instruction.settings)
        return sent

    def _evaluate(self, ids: Sequence[int], confusion: bool) -> dict[str, Any]:
        """The evaluation fields of a round's record: clients ``ids`` scored on their test shards."""
        clients, shards = self.clients.visit(ids), [self.data.clients[cid] for cid in ids]
        return self.evaluator(clients, shards, self.data.num_classes, confusion=confusion)

    def _end_round(self, round_: int, record: dict[str, Any]) -> None:
        """The round's record is complete: the clients it changed are saved."""
        self.clients.release(round_)

    # -- helpers of one round -------------------------------------------------------------------

    def _job(self, client_id: int, round_: int) -> FitJob:
        return FitJob(
            self.clients[client_id],
            self.data.clients[client_id],
            seed=fit_seed(self.seed, round_, client_id),
            epochs=self.cfg.local_epochs,
            restore_on_error=self.cfg.on_client_error == "drop",
        )

    def _training_flops(self, result: ClientResult) -> int:
        """FLOPs of a client's local fit: per-sample cost x samples x epochs."""
        name = self.model_names[result.client_id]
        if name not in self._flops_per_sample:
            client, data = self.clients[result.client_id], self.data.clients[result.client_id]
            self._flops_per_sample[name] = training_flops_per_sample(client, data)
        return round(self._flops_per_sample[name] * result.num_samples * self.cfg.local_epochs)

    def _account(self, round_: int, record: dict[str, Any], seconds: float) -> None:
        self.round = round_
        for key in ("bytes_up", "bytes_down", "train_flops"):
            self.totals[key] += record[key]
        self.totals["dropped"] += len(record["dropped"])
        self.totals["failed"] += len(record["failed"])
        self.totals["reported"] += record["reported"]
        self.empty_streak = self.empty_streak + 1 if record["reported"] == 0 else 0
        self.totals["wall_s"] += seconds
        record.update({f"total_{key}": value for key, value in self.totals.items() if key != "wall_s"})
        record["wall_s"] = seconds
        if record.get("mean_acc") is not None:
            self.final = record
            if self.best is None or record["mean_acc"] > self.best["mean_acc"]:
                self.best = record
            # The running best, in every evaluated round's history: what a sweep optimises and
            # early termination (Hyperband) reads, even from a run that never writes its summary.
            record["best_mean_acc"] = self.best["mean_acc"]

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "round": self.round,
            "server": self.algorithm.state_dict(),
            "clients": self.clients.state_dict(),
            "schedule": self.schedule,
            "totals": dict(self.totals),
            "empty_streak": self.empty_streak,
            "shared_numel": list(self.shared_numel),
            "final": self.final,
            "best": self.best,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        done = state["round"]
        if state["schedule"][:done] != self.schedule[:done]:
            raise ValueError("the checkpoint's client sampling differs from this config's; resume refused")
        self.round = done
        self.algorithm.load_state_dict(state["server"])
        self.clients.load_state_dict(state["clients"])
        # Checkpoints from before a total was added lack it; one without "reported" trained in its rounds.
        self.totals = {**self.totals, "reported": done, **state["totals"]}
        self.empty_streak = state.get("empty_streak", 0)
        self.shared_numel = list(state["shared_numel"])
        self.final, self.best = state["final"], state["best"]
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])

    def summary(self, status: str, reason: str | None = None) -> dict[str, Any]:
        """The run's ``summary.json``; ``status`` is ``completed``, ``interrupted`` (to be resumed),
        ``stopped`` (ended for good by its W&B sweep agent) or ``failed``."""
        final, best = self.final or {}, self.best or {}
        accs = final.get("client_acc", {})
        params: dict[str, int] = {}  # by model name: one client of each architecture is enough
        for cid, name in enumerate(self.model_names):
            if name not in params:
                params[name] = sum(p.numel() for p in next(self.clients.visit([cid])).parameters())
        return {
            "status": status,
            "reason": reason,
            "rounds": self.round,
            "rounds_planned": self.cfg.rounds,
            "final_mean_acc": final.get("mean_acc"),
            "final_weighted_acc": final.get("weighted_acc"),
            "best_mean_acc": best.get("mean_acc"),
            "best_round": best.get("round"),
            **{f"total_{key}": value for key, value in self.totals.items() if key != "wall_s"},
            "wall_s": self.totals["wall_s"],
            "partition_fingerprint": self.data.fingerprint,
            "no_test_clients": final.get("no_test_clients", []),
            "confusion": final.get("confusion"),  # summed over clients, in the last round: rows true, columns predicted
            "clients": [
                {
                    "id": cid,
                    "model": self.model_names[cid],
                    "params_total": params[self.model_names[cid]],
                    "params_shared": self.shared_numel[cid],
                    "train_samples": self.data.clients[cid].num_train,
                    "test_samples": self.data.clients[cid].num_test,
                    "final_acc": accs.get(str(cid)),
                }
                for cid in range(len(self.clients))
            ],
        }
