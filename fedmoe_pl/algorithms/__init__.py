"""Federated learning methods: each a client LightningModule plus the server's rules."""

from fedmoe_pl.algorithms.base import (
    DEFAULT_ZOO,
    Algorithm,
    ClientConfig,
    ClientContext,
    FederatedClient,
    state_payload,
)
from fedmoe_pl.algorithms.pfedmoe import PFedMoE, PFedMoEClient

__all__ = [
    "DEFAULT_ZOO",
    "Algorithm",
    "ClientConfig",
    "ClientContext",
    "FederatedClient",
    "PFedMoE",
    "PFedMoEClient",
    "state_payload",
]
