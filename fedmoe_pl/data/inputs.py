"""What one input sample is: the description a source gives and models and the gate are built from.

An image is ``channels x size x size`` uint8 pixels; a tabular row is ``features`` float values
(missing ones NaN until the data module's transform fills them); a text is ``length`` token ids
below ``vocab_size``. A zoo model is registered for one kind and takes the description's
:meth:`model_args` as keyword arguments, so an image model asked to read table rows is refused by
name rather than failing on a shape deep inside a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Union

InputKind = Literal["image", "tabular", "text"]


@dataclass(frozen=True)
class ImageInput:
    """Images of ``channels`` x ``size`` x ``size`` pixels."""

    channels: int
    size: int
    kind: InputKind = "image"

    def model_args(self) -> dict[str, Any]:
        return {"in_channels": self.channels, "image_size": self.size}

    @property
    def gate_features(self) -> int:
        """How many numbers the gate sees per sample: the flattened image."""
        return self.channels * self.size * self.size

    def describe(self) -> str:
        return f"{self.channels}x{self.size}x{self.size} images"


@dataclass(frozen=True)
class TabularInput:
    """Rows of ``features`` numbers."""

    features: int
    kind: InputKind = "tabular"

    def model_args(self) -> dict[str, Any]:
        return {"num_features": self.features}

    @property
    def gate_features(self) -> int:
        """The gate sees the standardized row itself."""
        return self.features

    def describe(self) -> str:
        return f"tabular rows of {self.features} features"


@dataclass(frozen=True)
class TextInput:
    """Sequences of ``length`` token ids below ``vocab_size`` (0 pads, 1 is the unknown token)."""

    vocab_size: int
    length: int
    kind: InputKind = "text"

    def model_args(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "seq_len": self.length}

    @property
    def gate_features(self) -> int:
        """The gate sees a hashed bag of the sequence's tokens (see :class:`~fedmoe_pl.models.gate.TokenBag`)."""
        return TOKEN_BAG_BUCKETS

    def describe(self) -> str:
        return f"texts of {self.length} tokens over a vocabulary of {self.vocab_size}"


TOKEN_BAG_BUCKETS = 256  # the hashed bag-of-tokens width a text gate sees

InputSpec = Union[ImageInput, TabularInput, TextInput]  # noqa: UP007 (a runtime alias)
