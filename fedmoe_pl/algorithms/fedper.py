"""FedPer: a shared body, a private head, trained together."""

from __future__ import annotations

from torch import nn

from fedmoe_pl.algorithms.base import Algorithm
from fedmoe_pl.algorithms.client import ClientConfig, ClientContext
from fedmoe_pl.algorithms.model_client import ModelClient


def require_one_architecture(method: str, clients: ClientConfig, overlay: str) -> None:
    """Refuse a heterogeneous zoo for a method that averages a part every client must share in shape."""
    if not clients.homogeneous:
        raise ValueError(
            f"{method} averages the clients' bodies, so every client needs the same model, but client.zoo is "
            f"{clients.zoo}; set client.zoo to a single model, e.g. [cnn1] ({overlay})"
        )


class BodyClient(ModelClient):
    """A client that shares its body (the zoo model's extractor: every layer before the last) and keeps
    its head (the last layer, representation -> logits)."""

    @property
    def shared(self) -> nn.Module:
        return self.model.extractor  # type: ignore[no-any-return]


class FedPer(Algorithm):
    """FedPer (Arivazhagan et al., 2019, "Federated Learning with Personalization Layers", arXiv 1912.00818).

    Each client trains its whole model (body and head together, cross-entropy) for the round's local
    epochs. Up: the body's state dict. Down: its sample-count-weighted average, which replaces the
    client's body; every client starts from client 0's body. The head (personalization layer) never
    leaves the client. The body's shape must be the same everywhere: homogeneous zoo only.
    """

    def check(self, clients: ClientConfig) -> None:
        require_one_architecture("FedPer", clients, "configs/methods/fedper.yaml")

    def build_client(self, ctx: ClientContext) -> BodyClient:
        return BodyClient(ctx, ctx.build())
