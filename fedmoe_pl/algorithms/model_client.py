"""Building blocks of the baselines: a client around one zoo model, and per-class statistics."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe_pl.algorithms.client import ClientContext, FederatedClient


class ClassStats:
    """Running per-class sums of vectors (representations or logits) and their counts."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.sums: torch.Tensor | None = None
        self.counts = torch.zeros(num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.sums = None
        self.counts = torch.zeros(self.num_classes, dtype=torch.int64)

    def add(self, values: torch.Tensor, labels: torch.Tensor) -> None:
        values = values.detach()  # (B, D)
        if self.sums is None:
            self.sums = torch.zeros(self.num_classes, values.shape[1], device=values.device)
            self.counts = self.counts.to(values.device)
        self.sums.index_add_(0, labels, values.float())
        self.counts += torch.bincount(labels, minlength=self.num_classes)

    def payload(self) -> dict[str, torch.Tensor]:
        """Per-class means (zero where a class was not seen) and counts, on the CPU."""
        if self.sums is None:
            raise RuntimeError("no statistics collected: upload() must follow a local fit")
        means = self.sums / self.counts.clamp(min=1)[:, None].float()  # (K, D)
        return {"means": means.cpu(), "counts": self.counts.cpu()}


class ModelClient(FederatedClient):
    """A client whose whole system is one zoo model trained with cross-entropy (Standalone).

    Args:
        ctx: the client's id, data shape and SGD settings.
        model: the client's zoo model (``extractor`` + ``head``).
    """

    model: Any  # a zoo model: an nn.Module with the ZooModel attributes
    batchable = True  # cross-entropy on the model's output, nothing else

    def __init__(self, ctx: ClientContext, model: nn.Module) -> None:
        super().__init__(ctx)
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)  # type: ignore[no-any-return]

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(x)  # (B, D)
        return features, self.model.forward_head(features)  # (B, K)


class StatsClient(ModelClient):
    """A ModelClient that gathers per-class statistics of its last local epoch while training.

    Gathering them in the training loop, as FedProto's reference code does, costs no second pass
    over the data. Subclasses choose what to gather (:meth:`statistic`) and add a regulariser.
    """

    batchable = False  # gathers statistics while training

    def __init__(self, ctx: ClientContext, model: nn.Module) -> None:
        super().__init__(ctx, model)
        self.stats = ClassStats(self.num_classes)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.stats.reset()

    def statistic(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """The per-sample vector whose class means are uploaded: the representation by default."""
        return features

    def regulariser(self, features: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return features.new_zeros(())

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        features, logits = self.features_and_logits(x)
        self.stats.add(self.statistic(features, logits), y)
        return F.cross_entropy(logits, y) + self.regulariser(features, logits, y)

    def upload(self) -> dict[str, torch.Tensor]:
        return self.stats.payload()
