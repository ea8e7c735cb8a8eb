"""Data: sources, seeded partitioners, per-client and federated data modules."""

from fedmoe_pl.data.client import ClientDataModule, TensorBatches
from fedmoe_pl.data.drift import Drift
from fedmoe_pl.data.federated import FederatedDataModule
from fedmoe_pl.data.local_sources import ImageFolder, Synthetic
from fedmoe_pl.data.partition import IID, Dirichlet, Partitioner, Pathological, assign, scale_counts
from fedmoe_pl.data.sources import CIFAR10, CIFAR100, MNIST, FashionMNIST, Source, SourceData
from fedmoe_pl.data.transforms import BatchTransform

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "IID",
    "MNIST",
    "BatchTransform",
    "ClientDataModule",
    "Dirichlet",
    "Drift",
    "FashionMNIST",
    "FederatedDataModule",
    "ImageFolder",
    "Partitioner",
    "Pathological",
    "Source",
    "SourceData",
    "Synthetic",
    "TensorBatches",
    "assign",
    "scale_counts",
]
