"""pFedMoE (Yi et al., arXiv 2402.01350): data-level personalization with a mixture of experts.

Crosses the client boundary: up, the client's copy of the global expert (a small homogeneous
extractor, CNN-5's by default); down, its sample-weighted average. The local expert, the gate
and the header never leave the client.
"""

from __future__ import annotations

from typing import Any

import torch

from fedmoe_pl.aggregation import Payload
from fedmoe_pl.algorithms.base import Algorithm, ClientContext, FederatedClient, state_payload
from fedmoe_pl.models import GateNorm, LocalMoE, ModelSpec, build_model, check_model_spec, parts


class PFedMoEClient(FederatedClient):
    """A client's local MoE trained end to end with cross-entropy by one SGD optimizer.

    Args:
        moe: the client's mixture of experts.
        num_classes: number of classes, for the accuracy metrics.
        lr: learning rate of every part but the gate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        gate_lr: learning rate of the gate; ``None`` uses ``lr``.
    """

    def __init__(
        self,
        moe: LocalMoE,
        num_classes: int,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-3,
        gate_lr: float | None = None,
    ) -> None:
        super().__init__(num_classes, lr, momentum, weight_decay)
        self.moe = moe
        self.gate_lr = gate_lr

    @property
    def shared(self) -> torch.nn.Module:
        """The one sub-module a federation may read and overwrite."""
        return self.moe.global_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x)[0]  # (B, classes)

    def predict_with_extras(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, weights = self.moe(x)
        return logits, {"gate_global": weights[:, 0]}

    def upload(self) -> Payload:
        return state_payload(self.shared)

    def download(self, payload: Payload) -> None:
        self.shared.load_state_dict(payload)

    def param_groups(self) -> list[dict[str, Any]]:
        gate = list(self.moe.gate.parameters())
        gate_ids = {id(p) for p in gate}
        rest = [p for p in self.parameters() if id(p) not in gate_ids]
        return [{"params": rest}, {"params": gate, "lr": self.gate_lr or self.lr}]


class PFedMoE(Algorithm):
    """pFedMoE's rules: build each client's local MoE; average the global experts by sample count.

    Args:
        global_expert: zoo model whose extractor is the shared global expert (paper: CNN-5).
        gate_hidden: hidden width of the gating network (the paper gives none; see the gate).
        gate_norm: normalization at the gate's input (paper: Switchable Normalization).
        gate_lr: a separate learning rate for the gate; ``None`` uses the clients' lr.
    """

    def __init__(
        self,
        global_expert: ModelSpec = "cnn5",
        gate_hidden: int = 64,
        gate_norm: GateNorm = "switch",
        gate_lr: float | None = None,
    ) -> None:
        check_model_spec(global_expert)
        self.global_expert = global_expert
        self.gate_hidden = gate_hidden
        self.gate_norm: GateNorm = gate_norm
        self.gate_lr = gate_lr

    def build_client(self, ctx: ClientContext) -> PFedMoEClient:
        dims = (ctx.in_channels, ctx.image_size, ctx.num_classes)
        local_expert, header = parts(build_model(ctx.model, *dims))
        global_expert, _ = parts(build_model(self.global_expert, *dims))
        moe = LocalMoE(
            global_expert=global_expert,
            local_expert=local_expert,
            header=header,
            in_features=ctx.in_channels * ctx.image_size**2,
            gate_hidden=self.gate_hidden,
            gate_norm=self.gate_norm,
        )
        cfg = ctx.config
        return PFedMoEClient(moe, ctx.num_classes, cfg.lr, cfg.momentum, cfg.weight_decay, self.gate_lr)
