"""Data: sources (images, table rows, texts), seeded partitioners, per-client and federated data modules."""

from fedmoe_pl.data.client import ClientDataModule, TensorBatches
from fedmoe_pl.data.drift import Drift
from fedmoe_pl.data.federated import FederatedDataModule
from fedmoe_pl.data.local_sources import ImageFolder, Synthetic
from fedmoe_pl.data.partition import IID, Dirichlet, Natural, Partitioner, Pathological, assign, scale_counts
from fedmoe_pl.data.sources import CIFAR10, CIFAR100, MNIST, FashionMNIST, Source, SourceData
from fedmoe_pl.data.tabular import HeartDisease
from fedmoe_pl.data.text import AGNews
from fedmoe_pl.data.transforms import BatchTransform, FeatureTransform

__all__ = [
    "AGNews",
    "CIFAR10",
    "CIFAR100",
    "IID",
    "MNIST",
    "Natural",
    "BatchTransform",
    "ClientDataModule",
    "Dirichlet",
    "Drift",
    "FashionMNIST",
    "FeatureTransform",
    "FederatedDataModule",
    "HeartDisease",
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
