"""The round protocol: what the server of every method says to its clients, and what it hears back.

In the spirit of Flower's strategies, each round the loop asks the method's :class:`Algorithm`
what to send to which sampled client (:meth:`Algorithm.configure`), has those clients trained,
and hands it their results (:meth:`Algorithm.aggregate`), which update the server's state and say
what goes back. Per-client downloads, schedules over rounds, and server randomness drawn from the
run's seed and the round (:meth:`Algorithm.server_rng`) all live here, so the loop knows no method.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedmoe_pl.aggregation import Payload, weighted_mean
from fedmoe_pl.algorithms.client import ClientConfig, ClientContext, FederatedClient
from fedmoe_pl.models import ModelSpec
from fedmoe_pl.run.schedule import SERVER_STREAM, FederationConfig


@dataclass
class Instruction:
    """What the server sends one client.

    Attributes:
        payload: state the client applies with ``download`` (counted in ``bytes_down``), or none.
        settings: per-round settings the client applies with ``configure_round`` (a few numbers,
            not counted).
    """

    payload: Payload | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientResult:
    """What one client reports after its local fit."""

    client_id: int
    upload: Payload
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


def check_number(
    method: str, name: str, value: float, low: float, high: float = math.inf, open_low: bool = False
) -> None:
    """Refuse a method setting outside its range, naming it (``low < value`` if ``open_low``, else ``<=``)."""
    above = value > low if open_low else value >= low
    if isinstance(value, bool) or not (math.isfinite(value) and above and value <= high):
        bounds = (
            f"{'(' if open_low else '['}{low}, {high}]"
            if math.isfinite(high)
            else (f"{'greater than' if open_low else 'at least'} {low}")
        )
        raise ValueError(f"{method} {name}={value} is out of range: it must be {bounds}")


class Algorithm(ABC):
    """A federated method: how to build its clients, and the server's side of every round.

    The constructor's arguments are the method's settings (``algorithm.init_args`` in YAML); a
    client class that needs them is handed the algorithm and reads them there. The server's state
    starts in :meth:`start` and is saved with every checkpoint through :meth:`state_dict`.

    The default protocol serves one global payload: before a client trains, it gets the current
    one unless it already holds it; the round's uploads are averaged by sample count
    (:meth:`combine`) and the result goes back to the clients that reported.
    """

    seed: int
    rounds: int
    global_payload: Payload

    def check(self, clients: ClientConfig) -> None:  # noqa: B027 (optional hook)
        """Refuse settings the method cannot run in, before any data is loaded."""

    def check_federation(self, federation: FederationConfig) -> None:  # noqa: B027 (optional hook)
        """Refuse round settings (local epochs, ...) the method cannot run with, before any data is loaded."""

    def model_specs(self) -> dict[str, ModelSpec]:
        """The zoo models the method itself names (besides the clients' zoo), by setting name, so that
        one that cannot read the data's inputs is refused before anything is written."""
        return {}

    @abstractmethod
    def build_client(self, ctx: ClientContext) -> FederatedClient:
        """Client ``ctx.client_id``'s module, freshly initialized."""

    # -- the server ---------------------------------------------------------------------------

    def start(self, clients: Sequence[FederatedClient], seed: int, rounds: int) -> None:
        """Set up the server's state before round 1 of a run of ``rounds`` rounds."""
        self.seed, self.rounds = seed, rounds
        self.global_payload = self.initial_global(clients)
        self.version = 0  # bumped at every aggregation
        self.held = [-1] * len(clients)  # the version each client holds; -1: none yet

    def initial_global(self, clients: Sequence[FederatedClient]) -> Payload:
        """The server's payload before round 1. Client 0's upload: every client starts from the same weights."""
        return clients[0].upload()

    def configure(self, round_: int, client_ids: Sequence[int]) -> dict[int, Instruction]:
        """What to send to each of the round's clients before its local fit (absent: nothing)."""
        return self.catch_up(client_ids)

    def aggregate(self, round_: int, results: Sequence[ClientResult]) -> dict[int, Instruction]:
        """Fold the round's results into the server state; return what to send back now."""
        if not results:  # nobody reported: the server keeps its state
            return {}
        self.global_payload = self.combine(round_, results)
        self.version += 1
        return self.catch_up([r.client_id for r in results])

    def combine(self, round_: int, results: Sequence[ClientResult]) -> Payload:
        """The new global payload from the round's results (sample-count weighted mean by default)."""
        return weighted_mean([r.upload for r in results], [r.num_samples for r in results])

    def catch_up(self, client_ids: Sequence[int]) -> dict[int, Instruction]:
        """The current global payload for each listed client that does not hold it yet."""
        out = {}
        for client_id in client_ids:
            if self.held[client_id] != self.version:
                out[client_id] = Instruction(self.global_payload)
                self.held[client_id] = self.version
        return out

    def server_rng(self, round_: int) -> np.random.Generator:
        """The server's random stream for one round: a pure function of the run's seed and the round."""
        return np.random.default_rng(np.random.SeedSequence([self.seed, SERVER_STREAM, round_]))

    def state_dict(self) -> dict[str, Any]:
        return {"global": self.global_payload, "version": self.version, "held": list(self.held)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.global_payload, self.version, self.held = state["global"], state["version"], list(state["held"])
