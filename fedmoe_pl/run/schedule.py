"""Who trains when, and with which randomness: pure functions of the run's seed and the round.

Each purpose draws from its own ``SeedSequence`` stream, so changing one (say, the dropout rate)
leaves the others (client sampling, the batches of each local fit) exactly as they were, and every
method sees the same schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

# SeedSequence keys: independent random streams of a run (1 is the data partition's).
SAMPLING_STREAM, TRAINING_STREAM, DROPOUT_STREAM, SERVER_STREAM, CLIENT_STREAM = 2, 3, 4, 5, 6


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
        on_client_error: when a client's local fit raises or its loss is not finite, ``stop`` the
            run (the last checkpoint stays intact) or ``drop`` the client from that round: its
            state is put back as it was before the fit, it uploads nothing, and the round's
            metrics count it under ``failed``.
        dropout: probability that a sampled client does not report in a round (a device that went
            offline): drawn from the run's seed and the round, so every method sees the same
            dropouts. The round aggregates the clients that did report.
        client_store: where clients live between rounds: ``memory`` (all of them, the whole run)
            or ``disk`` (a file per client, loaded when the client is sampled or evaluated and
            written back after the round; for client counts beyond memory). Results are the same.
        client_store_dir: the folder of the ``disk`` store (default: ``clients`` in the run
            directory). It must stay beside the run's checkpoint to resume.
        executor: how a round's clients train: ``sequential`` (a Lightning Trainer per client, in
            turn) or ``batched`` (the clients of one architecture stacked and trained together,
            one step for all; :mod:`fedmoe_pl.fleets.batched`) or ``auto`` (batched on a GPU when the
            ``trainer`` settings allow it, sequential otherwise; not yet the default, as the batched
            path is still to be measured on a GPU). Both give the same parameters up to float
            rounding; methods whose clients are not batchable train sequentially either way.
        batched_group: the most clients the batched executor stacks in one step (default: every
            client of an architecture on a GPU, one on a CPU, where stacking does not pay).
        max_empty_rounds: after this many consecutive rounds in which no client reported (all
            failed, dropped out or were unreachable) the run stops with ``status: failed``. A run
            in which no client ever reported never ends ``completed``, however short.
    """

    rounds: int = 5
    participation: float = 1.0
    local_epochs: int = 1
    eval_every: int = 1
    eval_clients: Literal["all", "sampled"] = "all"
    run_dir: str = "runs/default"
    on_client_error: Literal["stop", "drop"] = "stop"
    dropout: float = 0.0
    client_store: Literal["memory", "disk"] = "memory"
    client_store_dir: str | None = None
    executor: Literal["sequential", "batched", "auto"] = "sequential"
    batched_group: int | None = None
    max_empty_rounds: int = 3

    def __post_init__(self) -> None:
        if self.rounds <= 0:
            raise ValueError(f"federation.rounds must be a positive number of rounds, got {self.rounds}")
        if not 0 < self.participation <= 1:
            raise ValueError(f"federation.participation (C) must lie in (0, 1], got {self.participation}")
        if self.local_epochs <= 0 or self.eval_every <= 0:
            raise ValueError(
                f"federation.local_epochs ({self.local_epochs}) and eval_every ({self.eval_every}) must be positive"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"federation.dropout is a probability in [0, 1), got {self.dropout}")
        if self.client_store not in ("memory", "disk"):
            raise ValueError(f"federation.client_store must be 'memory' or 'disk', got {self.client_store!r}")
        if self.executor not in ("sequential", "batched", "auto"):
            raise ValueError(f"federation.executor must be 'sequential', 'batched' or 'auto', got {self.executor!r}")
        if self.batched_group is not None and self.batched_group < 1:
            raise ValueError(f"federation.batched_group must be a positive number of clients, got {self.batched_group}")
        if self.max_empty_rounds < 1:
            raise ValueError(
                f"federation.max_empty_rounds must be a positive number of rounds, got {self.max_empty_rounds}"
            )
        if self.on_client_error not in ("stop", "drop"):
            raise ValueError(f"federation.on_client_error must be 'stop' or 'drop', got {self.on_client_error!r}")


def clients_per_round(participation: float, num_clients: int) -> int:
    return max(1, math.ceil(round(participation * num_clients, 9)))


def sample_clients(seed: int, round_: int, num_clients: int, per_round: int) -> list[int]:
    """The clients of one round: a pure function of (seed, round), the same for every method."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, SAMPLING_STREAM, round_]))
    return sorted(rng.choice(num_clients, per_round, replace=False).tolist())


def dropped_clients(seed: int, round_: int, sampled: list[int], probability: float) -> set[int]:
    """The sampled clients that do not report in one round: a pure function of (seed, round)."""
    if probability == 0:
        return set()
    rng = np.random.default_rng(np.random.SeedSequence([seed, DROPOUT_STREAM, round_]))
    return {cid for cid, draw in zip(sampled, rng.random(len(sampled))) if draw < probability}


def fit_seed(seed: int, round_: int, client: int) -> int:
    """Seed of one local fit's shuffling and augmentation."""
    return int(np.random.SeedSequence([seed, TRAINING_STREAM, round_, client]).generate_state(1)[0])


def client_seed(seed: int, client: int) -> int:
    """Seed of a client's initial weights: any client can be built alone, in any order and process."""
    return int(np.random.SeedSequence([seed, CLIENT_STREAM, client]).generate_state(1)[0])
