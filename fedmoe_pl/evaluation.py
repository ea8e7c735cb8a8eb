"""Evaluation: each client's model on its own test set, on one device chosen once for the run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedmoe_pl.algorithms import FederatedClient
from fedmoe_pl.data import ClientDataModule


class Evaluator:
    """Per-client accuracy and diagnostics, and their means over clients.

    Runs outside a Trainer (a plain inference loop per client), which keeps the per-round cost
    low. Clients without test samples are left out of every mean.

    Args:
        device: where to evaluate; the experiment passes the device its Trainers train on.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    def __call__(self, clients: Sequence[FederatedClient], data: Sequence[ClientDataModule]) -> dict[str, Any]:
        results: dict[int, dict[str, float]] = {}
        sizes: dict[int, int] = {}
        for client, shard in zip(clients, data):
            if shard.num_test == 0:
                continue
            client.to(self.device)
            results[client.client_id] = client.evaluate(shard.eval_batches(self.device))
            sizes[client.client_id] = shard.num_test
            client.to("cpu")
        if not results:
            return {"mean_acc": None}
        ids = sorted(results)
        accs = np.array([results[cid]["acc"] for cid in ids])
        counts = np.array([sizes[cid] for cid in ids])
        out: dict[str, Any] = {
            "mean_acc": float(accs.mean()),
            "weighted_acc": float((accs * counts).sum() / counts.sum()),
            "std_acc": float(accs.std()),
            "min_acc": float(accs.min()),
            "client_acc": {str(cid): results[cid]["acc"] for cid in ids},
        }
        extras = {key for r in results.values() for key in r if key != "acc"}
        for key in sorted(extras):
            out[f"client_{key}"] = {str(cid): results[cid][key] for cid in ids if key in results[cid]}
        return out
