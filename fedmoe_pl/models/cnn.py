"""The CNN model zoo shared by pFedMoE and its sibling papers (CNN-1 ... CNN-5).

Every model is conv5x5 -> ReLU -> maxpool2 -> conv5x5 -> ReLU -> maxpool2 -> flatten -> FC1 -> ReLU
-> FC2 -> ReLU -> FC3. Everything before FC3 is the *extractor* (its output, ``feature_dim`` wide,
is the representation); FC3 is the *head*. Keeping the two as separate sub-modules is what lets
the mixture of experts and the baselines pick them apart by module, not by parameter name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CNNShape:
    """Channel and width choices that distinguish the zoo's members."""

    conv1: int
    conv2: int
    fc1: int
    width: int = 500


ZOO_SHAPES: dict[str, CNNShape] = {
    "cnn1": CNNShape(conv1=16, conv2=32, fc1=2000),
    "cnn2": CNNShape(conv1=16, conv2=16, fc1=2000),
    "cnn3": CNNShape(conv1=16, conv2=32, fc1=1000),
    "cnn4": CNNShape(conv1=16, conv2=32, fc1=800),
    "cnn5": CNNShape(conv1=16, conv2=32, fc1=500),
}


def _flat_side(image_size: int) -> int:
    """Side length after two (conv5x5, no padding) + (maxpool 2) stages."""
    side = ((image_size - 4) // 2 - 4) // 2
    if side < 1:
        raise ValueError(
            f"image_size={image_size} is too small for the CNN zoo: two 5x5 convolutions with "
            "2x2 pooling need images of at least 16x16 pixels; resize the data or pick another model."
        )
    return side


class CNNExtractor(nn.Module):
    """The zoo's feature extractor: image (B, C, H, W) -> representation (B, width)."""

    def __init__(self, shape: CNNShape, in_channels: int, image_size: int) -> None:
        super().__init__()
        side = _flat_side(image_size)
        self.out_features = shape.width
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, shape.conv1, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(shape.conv1, shape.conv2, kernel_size=5),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Sequential(
            nn.Linear(shape.conv2 * side * side, shape.fc1),
            nn.ReLU(inplace=True),
            nn.Linear(shape.fc1, shape.width),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))  # (B, width)


class SplitModel(nn.Module):
    """A zoo model split into ``extractor`` (input -> (B, feature_dim)) and ``head`` (-> logits), with
    timm's ``forward_features`` / ``forward_head``; every zoo family (CNN, MLP, text) is one.

    The extractor declares its output width as ``out_features``.
    """

    def __init__(self, extractor: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.extractor = extractor
        self.head = head

    @property
    def feature_dim(self) -> int:
        return int(self.extractor.out_features)  # type: ignore[arg-type]  # an int, by the contract

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x)  # type: ignore[no-any-return]  # (B, feature_dim)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)  # type: ignore[no-any-return]  # (B, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class CNN(SplitModel):
    """One member of the zoo, split into ``extractor`` and ``head`` (timm-style forward API)."""

    def __init__(self, shape: CNNShape, in_channels: int = 3, image_size: int = 32, num_classes: int = 10) -> None:
        extractor = CNNExtractor(shape, in_channels, image_size)  # built before the head, as always
        super().__init__(extractor, nn.Linear(shape.width, num_classes))
