"""FedRep: a shared representation learnt with each client's head fixed, after the head is fitted."""

from __future__ import annotations

from typing import Any

from fedmoe_pl.algorithms.base import Algorithm, check_number
from fedmoe_pl.algorithms.client import ClientConfig, ClientContext
from fedmoe_pl.algorithms.fedper import BodyClient, require_one_architecture
from fedmoe_pl.run.schedule import FederationConfig


class FedRepClient(BodyClient):
    """A FedPer client whose local fit alternates as FedRep's does: the head alone first (body frozen),
    then the body alone (head frozen) for the fit's last ``body_epochs`` epochs."""

    batchable = False  # which parameters train changes between epochs

    def __init__(self, ctx: ClientContext, model: Any, body_epochs: int) -> None:
        super().__init__(ctx, model)
        self.body_epochs = body_epochs

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        body = self.current_epoch >= int(self.trainer.max_epochs or 0) - self.body_epochs
        self.model.extractor.requires_grad_(body)  # a frozen part gets no gradient: SGD leaves it as it is
        self.model.head.requires_grad_(not body)

    def on_train_end(self) -> None:
        self.model.requires_grad_(True)


class FedRep(Algorithm):
    """FedRep (Collins et al., ICML 2021, "Exploiting Shared Representations for Personalized Federated
    Learning", arXiv 2102.07078).

    Each local fit of ``federation.local_epochs`` epochs first trains the client's head with its
    body frozen, then, for the last ``body_epochs`` epochs, the body with the head frozen (as
    published: 10 local epochs, the last one for the body; ``configs/methods/fedrep.yaml``). Up: the
    body's state dict. Down: its sample-count-weighted average, which replaces the client's body;
    every client starts from client 0's body. The head never leaves the client. Homogeneous zoo only.

    Args:
        body_epochs: the local epochs, at the end of each fit, that train the body.
    """

    def __init__(self, body_epochs: int = 1) -> None:
        check_number("FedRep", "body_epochs", body_epochs, 1)
        self.body_epochs = int(body_epochs)

    def check(self, clients: ClientConfig) -> None:
        require_one_architecture("FedRep", clients, "configs/methods/fedrep.yaml")

    def check_federation(self, federation: FederationConfig) -> None:
        if federation.local_epochs <= self.body_epochs:
            raise ValueError(
                f"FedRep trains the head for federation.local_epochs - body_epochs epochs, but local_epochs is "
                f"{federation.local_epochs} and body_epochs {self.body_epochs}: raise federation.local_epochs "
                f"above {self.body_epochs} (published: 10, configs/methods/fedrep.yaml) or lower body_epochs"
            )

    def build_client(self, ctx: ClientContext) -> FedRepClient:
        return FedRepClient(ctx, ctx.build(), self.body_epochs)
