"""The per-client gating network of pFedMoE.

Flattened raw input -> normalization -> Linear(d, hidden) -> Sigmoid -> Linear(hidden, 2) ->
Softmax. The two outputs weigh the global and the local expert for *each sample*. An image or a
table row is read as it is; a text as a hashed bag of its words (:class:`TokenBag`).

Default hidden width 64: the paper does not give it and public reimplementations use 32 to 128;
64 keeps the gate two orders of magnitude smaller than the smallest local model (about 50k
parameters on 28x28 gray input, 197k on 32x32 colour) while leaving room to separate classes.
There is deliberately no normalization after the softmax: it would break a_G + a_F = 1.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from fedmoe_pl.data.inputs import TOKEN_BAG_BUCKETS, InputSpec, TextInput
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


class TokenBag(nn.Module):
    """What a gate sees of a text: its words' ids hashed into ``buckets`` bins (id mod ``buckets``),
    counted and divided by the text's length. Fixed, without parameters, and cheap: the gate reads
    the mix of words, not their order, as it reads an image's raw pixels."""

    def __init__(self, buckets: int = TOKEN_BAG_BUCKETS) -> None:
        super().__init__()
        self.buckets = buckets

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        words = (ids != 0).float()  # (B, L); id 0 pads
        bag = torch.zeros(ids.shape[0], self.buckets, device=ids.device)
        bag.scatter_add_(1, ids % self.buckets, words)  # (B, buckets)
        return bag / words.sum(1, keepdim=True).clamp(min=1)


def gate_view(inputs: InputSpec) -> nn.Module:
    """What the gate reads of a sample: the flattened image or row itself; a text's :class:`TokenBag`."""
    return TokenBag() if isinstance(inputs, TextInput) else nn.Flatten()


class GatingNetwork(nn.Module):
    """Maps a batch to per-sample expert weights (B, 2): column 0 global, column 1 local.

    Args:
        in_features: numbers per sample after ``view`` (the flattened image: C*H*W).
        hidden: hidden width.
        norm: normalization of the gate's input.
        view: what the gate reads of a sample (:func:`gate_view`); flattened by default.
    """

    def __init__(
        self, in_features: int, hidden: int = 64, norm: GateNorm = "switch", view: nn.Module | None = None
    ) -> None:
        super().__init__()
        if hidden < 1:
            raise ValueError(f"gate hidden width must be positive, got {hidden}")
        self.view = view if view is not None else nn.Flatten()
        self.norm = _norm(norm, in_features)
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden),
            nn.Sigmoid(),
            nn.Linear(hidden, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.view(x)  # (B, C*H*W) of an image
        return self.net(self.norm(flat)).softmax(dim=1)  # (B, 2), rows sum to 1
