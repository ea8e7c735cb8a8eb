"""The round loop: sample -> configure -> local fits -> aggregate -> evaluate -> sinks.

    config -> Algorithm.configure(round, ids) -> Fleet.deliver -> Fleet.fit(cohort)
           -> Algorithm.aggregate(round, results) -> Fleet.evaluate -> Fleet.end_round -> sinks

The loop knows no method (see :class:`~fedmoe_pl.algorithms.Algorithm`), no place where clients
live or train (see :class:`~fedmoe_pl.fleets.fleet.Fleet`) and no file (see :mod:`fedmoe_pl.run.sinks`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedmoe_pl.aggregation import payload_bytes, payload_numel
from fedmoe_pl.algorithms import Algorithm, ClientResult
from fedmoe_pl.errors import ClientFailure, ClientUnreachable, NobodyReported
from fedmoe_pl.fleets.fleet import Cohort, Fleet
from fedmoe_pl.run.rundir import CHECKPOINT_FORMAT, PER_CLIENT, sectioned
from fedmoe_pl.run.schedule import FederationConfig, clients_per_round, dropped_clients, fit_seed, sample_clients
from fedmoe_pl.run.signals import StopSignals, stop_behind
from fedmoe_pl.run.sinks import Sink

log = logging.getLogger(__name__)

__all__ = ["Federation", "FederationConfig", "clients_per_round", "sample_clients"]
TOTALS = ("bytes_up", "bytes_down", "train_flops", "dropped", "failed", "reported")  # summed over rounds


class Federation:
    """Runs one experiment's rounds.

    Args:
        cfg: rounds, participation, local epochs, evaluation, failure policy.
        algorithm: the method: its clients' rules and its server.
        fleet: where the clients are and how they are reached (:class:`~fedmoe_pl.fleets.fleet.Fleet`).
        seed: the run's seed; every random stream derives from it.
        sinks: receive the run's events (metrics file, checkpoint, W&B, progress, summary).
    """

    def __init__(
        self, cfg: FederationConfig, algorithm: Algorithm, fleet: Fleet, seed: int, sinks: Sequence[Sink] = ()
    ) -> None:
        self.cfg, self.algorithm, self.fleet, self.seed, self.sinks = cfg, algorithm, fleet, seed, list(sinks)
        num_clients, per_round = fleet.num_clients, clients_per_round(cfg.participation, fleet.num_clients)
        self.schedule = [sample_clients(seed, r, num_clients, per_round) for r in range(1, cfg.rounds + 1)]
        algorithm.start(fleet.clients(), seed, cfg.rounds)
        self.round = 0
        self.totals: dict[str, Any] = {**dict.fromkeys(TOTALS, 0), "wall_s": 0.0}
        self.empty_streak = 0  # consecutive rounds, up to the last one, in which no client reported
        self.shared_numel = [0] * num_clients  # elements of each client's last upload
        self.final: dict[str, Any] | None = None  # the last evaluated round's record
        self.best: dict[str, Any] | None = None  # the evaluated round with the best mean accuracy

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
                raise NobodyReported(self.round, self.round)
            status = "completed"
        except BaseException as err:
            stop = stop_behind(err)  # also a stop that code between the signal and here made its own error
            if stop is None:
                reason = f"{type(err).__name__}: {err}"
                raise
            stop.round, reason, status = self.round, stop.name, "stopped" if stop.final else "interrupted"
            raise stop from (None if stop is err else err)
        finally:
            summary = self.summary(status, reason)
            for sink in self.sinks:
                sink.on_run_end(self, summary)
        return summary

    def _check_progress(self) -> None:
        """Stop a run that keeps training nobody (every client failing, offline or unreachable)."""
        if self.empty_streak >= self.cfg.max_empty_rounds:
            raise NobodyReported(self.round, self.empty_streak, self.cfg.max_empty_rounds)

    def _round(self, round_: int) -> dict[str, Any]:
        sampled = self.schedule[round_ - 1]
        offline = dropped_clients(self.seed, round_, sampled, self.cfg.dropout)
        reporting = [cid for cid in sampled if cid not in offline]
        bytes_down = self.fleet.deliver(self.algorithm.configure(round_, reporting))
        results: list[ClientResult] = []
        failed: list[int] = []
        for outcome in self.fleet.fit(self.cohort(round_, reporting)):
            if outcome.error is not None:
                if self.cfg.on_client_error == "stop" and not isinstance(outcome.error, ClientUnreachable):
                    raise ClientFailure(outcome.client_id, round_, outcome.error) from outcome.error
                log.warning("round %d: client %d dropped: %s", round_, outcome.client_id, outcome.error)
                failed.append(outcome.client_id)
            elif outcome.result is not None:
                results.append(outcome.result)
        bytes_down += self.fleet.deliver(self.algorithm.aggregate(round_, results))
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
            "train_flops": sum(
                round(self.fleet.flops_per_sample(r.client_id) * r.num_samples * self.cfg.local_epochs) for r in results
            ),
        }
        for r in results:
            self.shared_numel[r.client_id] = payload_numel(r.upload)
        if round_ % self.cfg.eval_every == 0 or round_ == self.cfg.rounds:
            ids = list(range(self.fleet.num_clients)) if self.cfg.eval_clients == "all" else sampled
            record.update(self.fleet.evaluate(round_, ids, confusion=round_ == self.cfg.rounds))
        record.update(self.fleet.end_round(round_))
        return record

    def cohort(self, round_: int, ids: Sequence[int]) -> Cohort:
        """The local fits of clients ``ids`` in a round: each with its own seed, a pure function of the
        run's seed, the round and the client."""
        seeds = {cid: fit_seed(self.seed, round_, cid) for cid in ids}
        return Cohort(round_, seeds, self.cfg.local_epochs, restore_on_error=self.cfg.on_client_error == "drop")

    def _account(self, round_: int, record: dict[str, Any], seconds: float) -> None:
        self.round = round_
        for key in TOTALS:  # lists of clients count by their length
            self.totals[key] += len(record[key]) if isinstance(record[key], list) else record[key]
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
            "clients": self.fleet.state_dict(),
            "schedule": self.schedule,
            "totals": dict(self.totals),
            "empty_streak": self.empty_streak,
            "shared_numel": list(self.shared_numel),
            "final": self.final,
            "best": self.best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        done = state["round"]
        if state["schedule"][:done] != self.schedule[:done]:
            raise ValueError("the checkpoint's client sampling differs from this config's; resume refused")
        self.round = done
        self.algorithm.load_state_dict(state["server"])
        self.fleet.load_state_dict(state["clients"])
        # Checkpoints from before a total was added lack it; one without "reported" trained in its rounds.
        self.totals = {**self.totals, "reported": done, **state["totals"]}
        self.empty_streak = state.get("empty_streak", 0)
        self.shared_numel = list(state["shared_numel"])
        self.final, self.best = (None if r is None else sectioned(r) for r in (state["final"], state["best"]))

    def summary(self, status: str, reason: str | None = None) -> dict[str, Any]:
        """The run's ``summary.json``; ``status`` is ``completed``, ``interrupted`` (to be resumed),
        ``stopped`` (ended for good by its W&B sweep agent) or ``failed``."""
        final, best = self.final or {}, self.best or {}
        accs = final.get(PER_CLIENT, {}).get("client_acc", {})
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
            "partition_fingerprint": self.fleet.fingerprint,
            "no_test_clients": final.get("no_test_clients", []),
            "confusion": final.get("confusion"),  # summed over clients, in the last round: rows true, columns predicted
            "clients": [
                {
                    "id": c,
                    **self.fleet.describe(c),
                    "params_shared": self.shared_numel[c],
                    "final_acc": accs.get(str(c)),
                }
                for c in range(self.fleet.num_clients)
            ],
        }
