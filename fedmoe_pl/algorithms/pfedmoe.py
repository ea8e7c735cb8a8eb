"""pFedMoE (Yi et al., arXiv 2402.01350): data-level personalization with a mixture of experts.

Crosses the client boundary: up, the client's copy of the global expert (a small homogeneous
extractor, CNN-5's by default); down, its sample-weighted average. The local expert, the gate
and the head never leave the client.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fedmoe_pl.algorithms.base import Algorithm, check_number
from fedmoe_pl.algorithms.client import ClientContext, FederatedClient
from fedmoe_pl.models import GateNorm, LocalMoE, ModelSpec, SwitchNorm1d, check_model_spec, parts
from fedmoe_pl.models.gate import gate_view


class PFedMoEClient(FederatedClient):
    """A client's local MoE trained end to end with cross-entropy by one SGD optimizer.

    Args:
        ctx: the client's id, data shape and SGD settings (``lr`` for every part but the gate).
        moe: the client's mixture of experts.
        method: the algorithm, for its ``gate_lr``.
    """

    batchable = True  # cross-entropy on the MoE's output; the gate norm's running statistics are buffers

    def __init__(self, ctx: ClientContext, moe: LocalMoE, method: PFedMoE) -> None:
        super().__init__(ctx)
        self.moe = moe
        self.method = method

    stacked_across = tuple(f"moe.{part}" for part in LocalMoE.common_parts)

    @property
    def shared(self) -> torch.nn.Module:
        """The one sub-module a federation may read and overwrite."""
        return self.moe.global_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x)[0]  # (B, classes)

    def common_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.moe.common_forward(x)

    def loss_after_common(self, common: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        weights, r_global = common
        return F.cross_entropy(self.moe.own_forward(weights, r_global, x), y)

    def diagnostics(self) -> dict[str, float]:
        """With the paper's Switchable-Norm gate: the learned weight on batch statistics (the rest is on
        layer statistics) for the mean (``gate_switch_mean_batch``) and the variance (``gate_switch_var_batch``)."""
        norm = self.moe.gate.norm
        if not isinstance(norm, SwitchNorm1d):
            return {}
        weights = norm.mixing_weights()
        return {"gate_switch_mean_batch": weights["mean"][1], "gate_switch_var_batch": weights["var"][1]}

    def predict_with_extras(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, weights = self.moe(x)
        return logits, {"gate_global": weights[:, 0]}

    def param_groups(self) -> list[dict[str, Any]]:
        gate = list(self.moe.gate.parameters())
        gate_ids = {id(p) for p in gate}
        rest = [p for p in self.parameters() if id(p) not in gate_ids]
        return [{"params": rest}, {"params": gate, "lr": self.method.gate_lr or self.config.lr}]


class PFedMoE(Algorithm):
    """pFedMoE's rules: build each client's local MoE; average the global experts by sample count.

    Args:
        global_expert: zoo model whose extractor is the shared global expert; None: the smallest
            model of the data's zoo (CNN-5, the paper's choice, for images; MLP-5 for tabular rows).
        gate_hidden: hidden width of the gating network (the paper gives none; see the gate).
        gate_norm: normalization at the gate's input (paper: Switchable Normalization).
        gate_lr: a separate learning rate for the gate; ``None`` uses the clients' lr.
    """

    def __init__(
        self,
        global_expert: ModelSpec | None = None,
        gate_hidden: int = 64,
        gate_norm: GateNorm = "switch",
        gate_lr: float | None = None,
    ) -> None:
        if global_expert is not None:
            check_model_spec(global_expert)
        if gate_lr is not None:
            check_number("PFedMoE", "gate_lr", gate_lr, 0.0, open_low=True)
        self.global_expert = global_expert
        self.gate_hidden = gate_hidden
        self.gate_norm: GateNorm = gate_norm
        self.gate_lr = gate_lr

    def model_specs(self) -> dict[str, ModelSpec]:
        return {} if self.global_expert is None else {"global_expert": self.global_expert}

    def build_client(self, ctx: ClientContext) -> PFedMoEClient:
        local_expert, head = parts(ctx.build())
        global_expert, _ = parts(ctx.build(ctx.small_model(self.global_expert)))
        moe = LocalMoE(
            global_expert=global_expert,
            local_expert=local_expert,
            head=head,
            in_features=ctx.sample.gate_features,
            gate_hidden=self.gate_hidden,
            gate_norm=self.gate_norm,
            gate_view=gate_view(ctx.sample),
        )
        return PFedMoEClient(ctx, moe, self)
