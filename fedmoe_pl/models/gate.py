"""The per-client gating network of pFedMoE.

Flattened raw input -> normalization -> Linear(d, hidden) -> Sigmoid -> Linear(hidden, 2) ->
Softmax. The two outputs weigh the global and the local expert for *each sample*.

Default hidden width 64: the paper does not give it and public reimplementations use 32 to 128;
64 keeps the gate two orders of magnitude smaller than the smallest local model (about 50k
parameters on 28x28 gray input, 197k on 32x32 colour) while leaving room to separate classes.
There is deliberately no normalization after the softmax: it would break a_G + a_F = 1.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from fedmoe_pl.models.switch_norm import SwitchNorm1d

GateNorm = Literal["switch", "batch", "layer", "none"]


def _norm(kind: GateNorm, num_features: int) -> nn.Module:
    if kind == "switch":
        return SwitchNorm1d(num_features)
    if kind == "batch":
        return nn.BatchNorm1d(num_features)
    if kind == "layer":
        return nn.LayerNorm(num_features)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"gate norm {kind!r} is not one of 'switch', 'batch', 'layer', 'none'")


class GatingNetwork(nn.Module):
    """Maps an image batch to per-sample expert weights (B, 2): column 0 global, column 1 local."""

    def __init__(self, in_features: int, hidden: int = 64, norm: GateNorm = "switch") -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"gate hidden width must be positive, got {hidden}")
        self.norm = _norm(norm, in_features)
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.Sigmoid(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)  # (B, C*H*W)
        return self.net(self.norm(flat)).softmax(dim=1)  # (B, 2), rows sum to 1
