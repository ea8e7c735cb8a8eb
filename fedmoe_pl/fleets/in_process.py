"""The fleet of a ``fedmoe-pl fit`` run: its clients in this process (or shared out over ranks).

Where the clients are kept between rounds is the pool's business (all in memory, or on disk until
sampled: :mod:`fedmoe_pl.fleets.clients`); how a cohort trains is the executor's (one Trainer each, stacked
on a GPU, or each rank its share: :mod:`fedmoe_pl.fleets.executor`, :mod:`fedmoe_pl.fleets.batched`,
:mod:`fedmoe_pl.fleets.distributed`); scoring is the evaluator's (:mod:`fedmoe_pl.analysis.evaluation`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from fedmoe_pl.aggregation import payload_bytes
from fedmoe_pl.algorithms import Algorithm, ClientConfig, ClientContext, FederatedClient, Instruction
from fedmoe_pl.analysis.evaluation import Evaluator, with_forgetting
from fedmoe_pl.analysis.flops import training_flops_per_sample
from fedmoe_pl.data import FederatedDataModule
from fedmoe_pl.fleets.clients import ClientPool, MemoryClients, ReadOnlyClients
from fedmoe_pl.fleets.executor import Executor, FitJob, SequentialExecutor
from fedmoe_pl.fleets.fleet import Cohort, FitOutcome
from fedmoe_pl.models import model_name
from fedmoe_pl.run.schedule import client_seed

log = logging.getLogger(__name__)


def client_builder(
    algorithm: Algorithm, client_cfg: ClientConfig, data: FederatedDataModule, seed: int
) -> Callable[[int], FederatedClient]:
    """Builds client ``cid`` freshly initialized: its weights a pure function of the run's seed and
    ``cid`` (drawn under a forked random state, which leaves the caller's untouched), so any client
    can be built alone, in any order, in any process."""
    dims = (data.in_channels, data.image_size, data.num_classes)

    def build(cid: int) -> FederatedClient:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(client_seed(seed, cid))
            ctx = ClientContext(cid, client_cfg.model_for(cid), *dims, client_cfg, inputs=data.inputs)
            return algorithm.build_client(ctx)

    return build


class InProcessFleet:
    """The run's clients in this process: a pool keeps them, an executor trains them, an evaluator scores them.

    Args:
        data: the partitioned data (``setup`` already called).
        client_cfg: the model zoo and SGD settings of every client.
        algorithm: the method, which builds the clients.
        seed: the run's seed (clients' initial weights derive from it).
        executor: trains a round's cohort (default: one Trainer per client, in turn).
        evaluator: scores clients on their test shards (default: on the CPU).
        pool: where the clients live between rounds (default: all in memory).
    """

    resumable = True

    def __init__(
        self,
        data: FederatedDataModule,
        client_cfg: ClientConfig,
        algorithm: Algorithm,
        seed: int,
        executor: Executor | None = None,
        evaluator: Evaluator | None = None,
        pool: ClientPool | None = None,
    ) -> None:
        self.data = data
        self.executor = executor or SequentialExecutor()
        self.evaluator = evaluator or Evaluator()
        self.pool: ClientPool = MemoryClients() if pool is None else pool
        self.pool.populate(client_builder(algorithm, client_cfg, data, seed), data.num_clients)
        self.num_clients = data.num_clients
        self.model_names = [model_name(client_cfg.model_for(cid)) for cid in range(data.num_clients)]
        self.fingerprint = data.fingerprint
        self._flops: dict[str, float] = {}  # by model name: clients of one architecture cost the same
        self._params: dict[str, int] = {}
        untested = [cid for cid in range(data.num_clients) if data.sizes(cid)[1] == 0]
        if untested:
            log.warning("clients %s have no test samples; they are left out of every accuracy mean", untested)

    def clients(self) -> Sequence[FederatedClient]:
        return ReadOnlyClients(self.pool)

    def deliver(self, instructions: dict[int, Instruction]) -> int:
        sent = 0
        for client_id, instruction in instructions.items():
            client = self.pool[client_id]
            if instruction.payload is not None:
                client.download(instruction.payload)
                sent += payload_bytes(instruction.payload)
            client.configure_round(**instruction.settings)
        return sent

    def jobs(self, cohort: Cohort) -> list[FitJob]:
        """The cohort's local fits, each on its client and shard."""
        shards = self.data.shards(cohort.round)
        return [
            FitJob(self.pool[cid], shards[cid], seed, cohort.epochs, cohort.restore_on_error)
            for cid, seed in cohort.seeds.items()
        ]

    def fit(self, cohort: Cohort) -> Iterator[FitOutcome]:
        return self.executor.fit(self.jobs(cohort))

    def evaluate(self, round_: int, ids: Sequence[int], confusion: bool) -> dict[str, Any]:
        """Score the clients on their shards of this round; after a drift, also on the ones they held
        before it (``mean_acc_before_drift``, ``per_client.client_acc_before_drift``: forgetting)."""
        shards = self.data.shards(round_)
        scores = self.evaluator(self.pool.visit(ids), [shards[cid] for cid in ids], self.data.num_classes, confusion)
        before = self.data.before_drift(round_)
        if before is not None and scores:
            earlier = self.evaluator(self.pool.visit(ids), [before[cid] for cid in ids], self.data.num_classes)
            return with_forgetting(scores, earlier)
        return scores

    def end_round(self, round_: int) -> dict[str, Any]:
        self.pool.release(round_)  # the clients the round changed are saved
        return self.executor.round_stats()

    def flops_per_sample(self, client_id: int) -> float:
        name = self.model_names[client_id]
        if name not in self._flops:
            client = next(self.pool.visit([client_id]))
            self._flops[name] = training_flops_per_sample(client, self.data.clients[client_id])
        return self._flops[name]

    def describe(self, client_id: int) -> dict[str, Any]:
        name = self.model_names[client_id]
        if name not in self._params:  # one client of each architecture is enough
            self._params[name] = sum(p.numel() for p in next(self.pool.visit([client_id])).parameters())
        train, test = self.data.sizes(client_id)
        return {"model": name, "params_total": self._params[name], "train_samples": train, "test_samples": test}

    def state_dict(self) -> Any:
        return self.pool.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.pool.load_state_dict(state)

    def checkpoint_saved(self) -> None:
        self.pool.checkpoint_saved()
