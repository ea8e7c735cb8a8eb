"""Federated learning methods: each a client LightningModule plus the server's side of the round protocol."""

from fedmoe_pl.algorithms.base import Algorithm, ClientResult, Instruction
from fedmoe_pl.algorithms.client import DEFAULT_ZOO, ClientConfig, ClientContext, FederatedClient, state_payload
from fedmoe_pl.algorithms.fedper import FedPer
from fedmoe_pl.algorithms.fedrep import FedRep
from fedmoe_pl.algorithms.model_client import ClassStats, ModelClient, StatsClient
from fedmoe_pl.algorithms.mutual import FML, FedAPEN, FedKD, MutualAlgorithm, MutualClient, svd_compress, svd_restore
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
    "ClientResult",
    "FedAPEN",
    "FedAvg",
    "FedGH",
    "FedKD",
    "FedPer",
    "FedProto",
    "FedRep",
    "FederatedClient",
    "Instruction",
    "LGFedAvg",
    "ModelClient",
    "MutualAlgorithm",
    "MutualClient",
    "PFedMoE",
    "PFedMoEClient",
    "Standalone",
    "StatsClient",
    "state_payload",
    "svd_compress",
    "svd_restore",
]
