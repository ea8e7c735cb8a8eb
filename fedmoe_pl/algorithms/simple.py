"""The parameter-averaging baselines: Standalone, FedAvg and LG-FedAvg."""

from __future__ import annotations

from torch import nn

from fedmoe_pl.algorithms.base import Algorithm
from fedmoe_pl.algorithms.client import ClientConfig, ClientContext
from fedmoe_pl.algorithms.model_client import ModelClient


class Standalone(Algorithm):
    """Every client trains its own model alone. Nothing crosses the client boundary: zero bytes."""

    def build_client(self, ctx: ClientContext) -> ModelClient:
        return ModelClient(ctx, ctx.build())


class WholeModelClient(ModelClient):
    """A FedAvg client: uploads its whole model and replaces it with the server's average."""

    @property
    def shared(self) -> nn.Module:
        return self.model  # type: ignore[no-any-return]


class FedAvg(Algorithm):
    """FedAvg (McMahan et al., AISTATS 2017, arXiv 1602.05629).

    Up: the whole model's state dict. Down: its sample-count-weighted average. Needs every client
    on the same architecture, so it runs only in the model-homogeneous setting.
    """

    def check(self, clients: ClientConfig) -> None:
        if not clients.homogeneous:
            raise ValueError(
                f"FedAvg averages whole models, so every client needs the same one, but client.zoo is "
                f"{clients.zoo}; set client.zoo to a single model, e.g. [cnn1] (configs/methods/fedavg.yaml)"
            )

    def build_client(self, ctx: ClientContext) -> WholeModelClient:
        return WholeModelClient(ctx, ctx.build())


class HeadClient(ModelClient):
    """An LG-FedAvg client: shares its head, keeps its extractor."""

    @property
    def shared(self) -> nn.Module:
        return self.model.head  # type: ignore[no-any-return]


class LGFedAvg(Algorithm):
    """LG-FedAvg (Liang et al., 2020, arXiv 2001.01523), in the head-sharing form of pFedMoE's comparison.

    Up: the client's head (representation -> logits; the same shape on every zoo model). Down:
    the sample-weighted average head, which replaces the client's. Extractors stay private.
    """

    def build_client(self, ctx: ClientContext) -> HeadClient:
        return HeadClient(ctx, ctx.build())
