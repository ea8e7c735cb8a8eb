"""The tabular model zoo (MLP-1 ... MLP-5): the CNN zoo's counterpart for rows of numbers.

Every model is a stack of Linear -> ReLU layers ending in a projection to the common width
(64) -> ReLU: that stack is the *extractor*; one Linear to the classes is the *head*. Members
differ in depth and width, from three hidden layers of 256/256/128 (MLP-1) to one of 64 (MLP-5,
the smallest, pFedMoE's default global expert on tabular data), as the CNN zoo differs from CNN-1
to CNN-5. All produce the same representation width, so the mixture can add them element-wise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedmoe_pl.models.cnn import SplitModel


@dataclass(frozen=True)
class MLPShape:
    """Hidden layer widths and the representation width."""

    hidden: tuple[int, ...]
    width: int = 64


MLP_SHAPES: dict[str, MLPShape] = {
    "mlp1": MLPShape(hidden=(256, 256, 128)),
    "mlp2": MLPShape(hidden=(256, 128)),
    "mlp3": MLPShape(hidden=(128, 128)),
    "mlp4": MLPShape(hidden=(128,)),
    "mlp5": MLPShape(hidden=(64,)),
}


class MLPExtractor(nn.Module):
    """Rows (B, num_features) -> representation (B, width)."""

    def __init__(self, shape: MLPShape, num_features: int) -> None:
        super().__init__()
        if num_features < 1:
            raise ValueError(f"num_features={num_features}: a tabular model needs at least one feature")
        self.out_features = shape.width
        layers: list[nn.Module] = []
        wide = num_features
        for width in (*shape.hidden, shape.width):
            layers += [nn.Linear(wide, width), nn.ReLU(inplace=True)]
            wide = width
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, width)


class MLP(SplitModel):
    """One member of the tabular zoo, split into ``extractor`` and ``head`` like the CNNs."""

    def __init__(self, shape: MLPShape, num_features: int, num_classes: int = 2) -> None:
        extractor = MLPExtractor(shape, num_features)
        super().__init__(extractor, nn.Linear(shape.width, num_classes))
