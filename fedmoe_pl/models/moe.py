"""A client's local mixture of experts: global expert + local expert, mixed per sample by a gate."""

from __future__ import annotations

import torch
from torch import nn

from fedmoe_pl.models.gate import GateNorm, GatingNetwork


def _width(module: nn.Module) -> int:
    width = getattr(module, "out_features", None)
    if not isinstance(width, int):
        raise TypeError(f"{type(module).__name__} does not declare its output width `out_features`")
    return width


class LocalMoE(nn.Module):
    """``logits = head(a_G * global_expert(x) + a_F * local_expert(x))`` with ``(a_G, a_F) = gate(x)``.

    Only ``global_expert`` is ever shared; the other three sub-modules are the client's own.

    Args:
        global_expert: the small extractor every client holds a copy of.
        local_expert: the client's own (heterogeneous) extractor.
        head: the client's own last layer, representation -> logits.
        in_features: numbers per sample the gate sees (C*H*W of a flattened image).
        gate_hidden: hidden width of the gate.
        gate_norm: normalization at the gate's input.
        gate_view: what the gate reads of a sample (see :func:`~fedmoe_pl.models.gate.gate_view`);
            the flattened input by default.
    """

    def __init__(
        self,
        global_expert: nn.Module,
        local_expert: nn.Module,
        head: nn.Module,
        in_features: int,
        gate_hidden: int = 64,
        gate_norm: GateNorm = "switch",
        gate_view: nn.Module | None = None,
    ) -> None:
        super().__init__()
        global_width, local_width = _width(global_expert), _width(local_expert)
        if global_width != local_width:
            raise ValueError(
                f"the global expert's representation is {global_width} wide but the local expert's "
                f"is {local_width}; the gate mixes them element-wise, so both extractors must "
                "produce the same width"
            )
        self.global_expert = global_expert
        self.local_expert = local_expert
        self.gate = GatingNetwork(in_features, gate_hidden, gate_norm, gate_view)
        self.head = head

    #: The sub-modules whose shapes do not depend on the client's architecture: every client of a
    #: federation holds them alike, so a batched executor can stack them across architectures.
    common_parts = ("gate", "global_expert")

    def common_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The common parts' outputs: (gate weights (B, 2), global representation (B, W))."""
        return self.gate(x), self.global_expert(x)

    def own_forward(self, weights: torch.Tensor, r_global: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The client's own parts after :meth:`common_forward`: local expert, mix, head -> logits."""
        r_local = self.local_expert(x)  # (B, W)
        mixed = weights[:, :1] * r_global + weights[:, 1:] * r_local  # (B, W)
        return self.head(mixed)  # type: ignore[no-any-return]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits (B, classes), gate weights (B, 2))."""
        weights, r_global = self.common_forward(x)
        return self.own_forward(weights, r_global, x), weights
