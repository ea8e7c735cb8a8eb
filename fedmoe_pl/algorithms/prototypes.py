"""Baselines that share per-class statistics instead of weights: FedGH, FD and FedProto."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

import torch
import torch.nn.functional as F

from fedmoe_pl.aggregation import Payload, classwise_mean
from fedmoe_pl.algorithms.base import Algorithm, ClientResult, check_number
from fedmoe_pl.algorithms.client import ClientContext, FederatedClient, state_payload
from fedmoe_pl.algorithms.losses import kl
from fedmoe_pl.algorithms.model_client import StatsClient


def no_class_stats(num_classes: int, width: int) -> Payload:
    """The server's state before any upload: nothing known about any class."""
    return {"means": torch.zeros(num_classes, width), "counts": torch.zeros(num_classes, dtype=torch.int64)}


class ClassStatsAlgorithm(Algorithm):
    """Servers that combine per-class statistics: sample-weighted per-class means of the uploads."""

    def combine(self, round_: int, results: Sequence[ClientResult]) -> Payload:
        uploads = [r.upload for r in results]
        means, counts = classwise_mean([u["means"] for u in uploads], [u["counts"] for u in uploads])
        return {"means": means, "counts": counts.to(torch.int64)}


class ClassTargetClient(StatsClient):
    """A StatsClient that receives per-class targets from the server (global logits, prototypes).

    Args:
        ctx: the client's id, data shape and SGD settings.
        model: the client's zoo model.
        width: the width of one class's target.
    """

    targets: torch.Tensor
    known: torch.Tensor

    def __init__(self, ctx: ClientContext, model: torch.nn.Module, width: int) -> None:
        super().__init__(ctx, model)
        self.register_buffer("targets", torch.zeros(self.num_classes, width))  # (K, width)
        self.register_buffer("known", torch.zeros(self.num_classes, dtype=torch.bool))  # classes with a target

    def download(self, payload: Payload) -> None:
        self.targets.copy_(payload["means"])
        self.known.copy_(payload["counts"] > 0)


def _own_where_unknown(targets: torch.Tensor, values: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Each sample's class target, or its own (detached) value where the class has none yet.

    The published rule for classes without a global target (FedProto's code): such a sample adds
    zero to the squared error but still counts in the batch mean, so the term does not grow as
    fewer of a batch's classes are known. FD's KL branch follows the same rule.
    """
    return torch.where(known[:, None], targets, values.detach())  # (B, width)


# -- FedGH --------------------------------------------------------------------------------------


class FedGHClient(StatsClient):
    """A FedGH client: uploads per-class mean representations; the server's global head replaces its own."""

    @property
    def shared(self) -> torch.nn.Module:
        """What comes down: the server's global head replaces this one (what goes up are statistics)."""
        return self.model.head  # type: ignore[no-any-return]


class FedGH(Algorithm):
    """FedGH (Yi et al., ACM MM 2023, arXiv 2305.13137): a generalized global head (the paper's "header").

    Up: per-class mean representations of the client's last local epoch (classes x width) and
    their counts. The server trains a global head (width -> classes) on the uploaded
    representations with cross-entropy, one representation per step in a random order (FedGH's
    code shuffles them), continuing from last round's head. Down: that head, which replaces the
    client's own. The order is drawn from the run's seed and the round, so a resumed run repeats it.

    Args:
        server_lr: SGD learning rate of the global head (FedGH's code: 0.01).
        server_epochs: passes over the round's uploaded representations.
    """

    def __init__(self, server_lr: float = 0.01, server_epochs: int = 1) -> None:
        check_number("FedGH", "server_lr", server_lr, 0.0, open_low=True)
        check_number("FedGH", "server_epochs", server_epochs, 1)
        self.server_lr, self.server_epochs = server_lr, server_epochs

    def build_client(self, ctx: ClientContext) -> FedGHClient:
        return FedGHClient(ctx, ctx.build())

    def initial_global(self, clients: Sequence[FederatedClient]) -> Payload:
        return state_payload(cast(FedGHClient, clients[0]).model.head)

    def combine(self, round_: int, results: Sequence[ClientResult]) -> Payload:
        previous = self.global_payload
        weight, bias = previous["weight"].clone().requires_grad_(), previous["bias"].clone().requires_grad_()
        optimizer = torch.optim.SGD([weight, bias], lr=self.server_lr)
        uploads = [r.upload for r in results]
        reps = torch.cat([u["means"][u["counts"] > 0] for u in uploads])  # (R, width)
        labels = torch.cat([torch.nonzero(u["counts"] > 0).flatten() for u in uploads])  # (R,)
        rng = self.server_rng(round_)
        for _ in range(self.server_epochs):
            for i in rng.permutation(len(labels)):  # one representation per step, as in FedGH
                loss = F.cross_entropy(reps[i : i + 1] @ weight.T + bias, labels[i : i + 1])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return {"weight": weight.detach(), "bias": bias.detach()}


# -- FD -----------------------------------------------------------------------------------------


class FDClient(ClassTargetClient):
    """An FD client: uploads per-class mean logits and distils toward the global ones (its targets)."""

    def __init__(self, ctx: ClientContext, model: torch.nn.Module, method: FD) -> None:
        super().__init__(ctx, model, width=ctx.num_classes)
        self.method = method

    def statistic(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def regulariser(self, features: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        known = self.known[y]  # (B,) classes the server has logits for
        if not known.any():
            return logits.new_zeros(())
        weight = self.method.distill_weight
        if self.method.distill_loss == "mse":
            return weight * F.mse_loss(logits, _own_where_unknown(self.targets[y], logits, known))
        # KL per known sample, averaged over the whole batch: an unknown sample counts as zero.
        return weight * kl(logits[known], self.targets[y[known]]) * known.float().mean()


class FD(ClassStatsAlgorithm):
    """FD, federated distillation (Jeong et al., 2018, arXiv 1811.11479).

    Up: per-class mean logits of the last local epoch (classes x classes) and their counts. Down:
    their sample-weighted per-class average. Clients add ``distill_weight`` (the paper's beta, 1)
    times a distillation term between their output and the global logits of each sample's class,
    averaged over the batch with zero for a sample whose class has no global logits yet.
    The paper's term compares the softmax distributions (``kl``, the default); ``mse`` is PFLlib's
    variant on raw logits, which diverged to NaN in round 2 of the quickstart with momentum 0.9,
    because confidently separated classes have mean logits of 30 and more.

    Args:
        distill_weight: weight of the distillation term.
        distill_loss: ``kl`` (paper) or ``mse`` (PFLlib).
    """

    def __init__(self, distill_weight: float = 1.0, distill_loss: Literal["kl", "mse"] = "kl") -> None:
        check_number("FD", "distill_weight", distill_weight, 0.0)
        if distill_loss not in ("kl", "mse"):
            raise ValueError(f"FD distill_loss={distill_loss!r}; use 'kl' or 'mse'")
        self.distill_weight, self.distill_loss = distill_weight, distill_loss

    def build_client(self, ctx: ClientContext) -> FDClient:
        return FDClient(ctx, ctx.build(), self)

    def initial_global(self, clients: Sequence[FederatedClient]) -> Payload:
        num_classes = clients[0].num_classes
        return no_class_stats(num_classes, num_classes)


# -- FedProto -----------------------------------------------------------------------------------


class FedProtoClient(ClassTargetClient):
    """A FedProto client: uploads class prototypes, pulls its representations toward the global ones (its targets)."""

    def __init__(self, ctx: ClientContext, model: torch.nn.Module, method: FedProto) -> None:
        super().__init__(ctx, model, width=model.feature_dim)  # type: ignore[arg-type]
        self.method = method

    def regulariser(self, features: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        known = self.known[y]
        if not known.any():
            return features.new_zeros(())
        return self.method.proto_weight * F.mse_loss(features, _own_where_unknown(self.targets[y], features, known))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features, logits = self.features_and_logits(x)
        if self.method.inference == "head" or not self.known.any():
            return logits
        distance = torch.cdist(features, self.targets)  # (B, K)
        return -distance.masked_fill(~self.known, float("inf"))  # nearest prototype wins


class FedProto(ClassStatsAlgorithm):
    """FedProto (Tan et al., AAAI 2022, arXiv 2105.00243).

    Up: per-class prototypes (mean representations of the last local epoch) and their counts.
    Down: the sample-weighted global prototypes. Clients add ``proto_weight`` (the paper's lambda,
    default 1) times the mean squared distance between each representation and its class's
    global prototype, averaged over the whole batch: a sample whose class has no prototype yet
    adds zero (as in FedProto's code).

    Args:
        proto_weight: weight of the prototype regulariser.
        inference: classify with the client's head, or by the nearest global prototype.
    """

    def __init__(self, proto_weight: float = 1.0, inference: Literal["head", "prototype"] = "head") -> None:
        check_number("FedProto", "proto_weight", proto_weight, 0.0)
        if inference not in ("head", "prototype"):
            raise ValueError(f"FedProto inference={inference!r}; use 'head' or 'prototype'")
        self.proto_weight, self.inference = proto_weight, inference

    def build_client(self, ctx: ClientContext) -> FedProtoClient:
        return FedProtoClient(ctx, ctx.build(), self)

    def initial_global(self, clients: Sequence[FederatedClient]) -> Payload:
        client = cast(FedProtoClient, clients[0])
        return no_class_stats(client.num_classes, client.model.feature_dim)
