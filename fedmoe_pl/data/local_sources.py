"""Sources that need no download: a folder of image files, and synthetic data for tests and smoke runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedmoe_pl.data.sources import Source, SourceData


class ImageFolder(Source):
    """Custom data: ``root/train/<class>/*`` and ``root/test/<class>/*`` image files.

    Args:
        root: folder holding ``train`` and ``test``.
        grayscale: load as one channel instead of RGB.
    """

    def __init__(self, root: str, grayscale: bool = False) -> None:
        self.root = Path(root)
        self.grayscale = grayscale

    def _read(self, split: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        from PIL import Image

        folder = self.root / split
        if not folder.is_dir():
            raise FileNotFoundError(
                f"ImageFolder root {str(self.root)!r} has no {split!r} folder; it must hold "
                "train/<class>/ and test/<class>/ image folders"
            )
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
        images, labels = [], []
        for label, name in enumerate(classes):
            for path in sorted((folder / name).iterdir()):
                with Image.open(path) as img:
                    arr = np.asarray(img.convert("L" if self.grayscale else "RGB"))
                images.append(arr)
                labels.append(label)
        shapes = {a.shape for a in images}
        if len(shapes) != 1:
            raise ValueError(
                f"images under {str(folder)!r} have different sizes {sorted(shapes)}; resize them to one size first"
            )
        stacked = torch.as_tensor(np.stack(images))
        x = stacked.unsqueeze(1) if self.grayscale else stacked.permute(0, 3, 1, 2)
        return classes, x.contiguous(), torch.tensor(labels, dtype=torch.int64)

    def load(self) -> SourceData:
        train_classes, train_x, train_y = self._read("train")
        test_classes, test_x, test_y = self._read("test")
        if train_classes != test_classes:
            raise ValueError(
                f"ImageFolder {str(self.root)!r}: train classes {train_classes} differ from test "
                f"classes {test_classes}; both folders need the same class sub-folders"
            )
        return SourceData(
            train_x,
            train_y,
            test_x,
            test_y,
            len(train_classes),
            identity=f"imagefolder:{self.root.name}",
            classes=train_classes,
        )


class Synthetic(Source):
    """Learnable synthetic images for tests and smoke runs: a fixed pattern per class plus noise.

    Args:
        num_classes: number of classes.
        channels: image channels.
        image_size: square image side.
        train_per_class: training samples per class.
        test_per_class: test samples per class.
        noise: std of the per-pixel noise, in uint8 levels.
        seed: seed of the patterns and the noise.
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: int = 1,
        image_size: int = 16,
        train_per_class: int = 60,
        test_per_class: int = 20,
        noise: float = 40.0,
        seed: int = 0,
    ) -> None:
        self.num_classes = num_classes
        self.shape = (channels, image_size, image_size)
        self.per_class = (train_per_class, test_per_class)
        self.noise = noise
        self.seed = seed

    def _make(self, per_class: int, patterns: torch.Tensor, gen: torch.Generator):  # type: ignore[no-untyped-def]
        labels = torch.arange(self.num_classes).repeat_interleave(per_class)
        noise = torch.randn((len(labels), *self.shape), generator=gen) * self.noise
        images = (patterns[labels] + noise).clamp_(0, 255).to(torch.uint8)
        return images, labels

    def load(self) -> SourceData:
        gen = torch.Generator().manual_seed(self.seed)
        patterns = torch.rand((self.num_classes, *self.shape), generator=gen) * 255
        train_x, train_y = self._make(self.per_class[0], patterns, gen)
        test_x, test_y = self._make(self.per_class[1], patterns, gen)
        identity = f"synthetic:{self.num_classes}x{self.shape}x{self.per_class}:{self.noise}:{self.seed}"
        return SourceData(train_x, train_y, test_x, test_y, self.num_classes, identity)
