"""Federated learning methods: each a client LightningModule plus the server's rules."""

from fedmoe_pl.algorithms.base import (
    DEFAULT_ZOO,
    Algorithm,
    ClientConfig,
    ClientContext,
    FederatedClient,
    state_payload,
)
from fedmoe_pl.algorithms.model_client import ClassStats, ModelClient
from fedmoe_pl.algorithms.mutual import FML, FedAPEN, FedKD, svd_compress, svd_restore
from fedmoe_pl.algorithms.pfedmoe import PFedMoE, PFedMoEClient
from fedmoe_pl.algorithms.prototypes import FD, FedGH, FedProto
from fedmoe_pl.algorithms.simple import FedAvg, LGFedAvg, Standalone

__all__ = [
    "DEFAULT_ZOO",
    "FD",
    "FML",
    "Algorithm",
    "ClassStats",
    "ClientConfig",
    "ClientContext",
    "FedAPEN",
    "FedAvg",
    "FedGH",
    "FedKD",
    "FedProto",
    "FederatedClient",
    "LGFedAvg",
    "ModelClient",
    "PFedMoE",
    "PFedMoEClient",
    "Standalone",
    "state_payload",
    "svd_compress",
    "svd_restore",
]
