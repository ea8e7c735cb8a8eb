"""The seam between the round loop and wherever a run's clients are: a :class:`Fleet`.

The loop (:class:`~fedmoe_pl.run.federation.Federation`) decides *what* happens in a round: which
clients train, what the server sends them, what it does with their results. A fleet answers for
*where* that happens: it hands the server's instructions to its clients, trains a cohort, scores
clients on their test shards, and reports what it measured of the round. Calls go one way: the
loop calls the fleet, the fleet never calls the loop.

Shipped fleets: the clients in this process, or spread over ranks
(:class:`~fedmoe_pl.fleets.in_process.InProcessFleet`), and the clients on Flower SuperNodes
(:class:`~fedmoe_pl.flower.server.FlowerFleet`). A new place for clients (Ray actors, a process
pool) is one class with the methods below; the README's "Adding a place for clients" shows one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedmoe_pl.algorithms import ClientResult, FederatedClient, Instruction


@dataclass(frozen=True)
class Cohort:
    """The clients that train in a round, and how.

    Attributes:
        round: the round (1-based).
        seeds: client id -> seed of its local fit (shuffling and augmentation), in training order.
        epochs: local epochs of every fit.
        restore_on_error: a client whose fit fails gets its state from before the fit back.
    """

    round: int
    seeds: dict[int, int]
    epochs: int
    restore_on_error: bool = False

    @property
    def ids(self) -> list[int]:
        return list(self.seeds)


@dataclass
class FitOutcome:
    """A client's result, or the error that ended its fit (its state then as ``restore_on_error`` says)."""

    client_id: int
    result: ClientResult | None = None
    error: Exception | None = None


def diverged(loss: float) -> FloatingPointError | None:
    """The error of a local fit whose training loss is not finite, or None."""
    if math.isfinite(loss):
        return None
    return FloatingPointError(f"the training loss is {loss}; lower client.lr or check the data")


class Fleet(Protocol):
    """Where a run's clients are, and how the loop reaches them.

    Attributes:
        num_clients: clients of the federation, ids ``0 .. num_clients - 1``.
        model_names: each client's model, by id.
        fingerprint: the partition's fingerprint (the summary records it).
        resumable: whether :meth:`state_dict` captures the clients, so that a checkpoint can resume
            the run (False where the clients keep their state themselves, as Flower's nodes do).
    """

    num_clients: int
    model_names: list[str]
    fingerprint: str
    resumable: bool

    def clients(self) -> Sequence[FederatedClient]:
        """Clients to read, not train: what the method's server starts from (:meth:`Algorithm.start`)."""
        ...

    def deliver(self, instructions: dict[int, Instruction]) -> int:
        """Hand each client its instruction (now or with its next message); the bytes of state sent."""
        ...

    def fit(self, cohort: Cohort) -> Iterator[FitOutcome]:
        """Train the cohort; one outcome per client, in the cohort's order."""
        ...

    def evaluate(self, round_: int, ids: Sequence[int], confusion: bool) -> dict[str, Any]:
        """Score clients ``ids`` on their test shards: the evaluation fields of the round's record
        (:func:`fedmoe_pl.analysis.evaluation.summarize`)."""
        ...

    def end_round(self, round_: int) -> dict[str, Any]:
        """The round's record is complete: keep what the round changed; return what the fleet measured
        of the round (bytes on the wire, samples per rank, ...) for the record."""
        ...

    def flops_per_sample(self, client_id: int) -> float:
        """Training FLOPs of one sample of a client's local fit (forward and backward)."""
        ...

    def describe(self, client_id: int) -> dict[str, Any]:
        """A client in the summary: ``model``, ``params_total``, ``train_samples``, ``test_samples``."""
        ...

    def state_dict(self) -> Any:
        """The clients' state for a checkpoint (only called when ``resumable``)."""
        ...

    def load_state_dict(self, state: Any) -> None: ...

    def checkpoint_saved(self) -> None:
        """The checkpoint holding the last :meth:`state_dict` is safely written."""
        ...
