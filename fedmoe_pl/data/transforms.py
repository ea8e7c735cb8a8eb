"""Batched transforms: images on uint8 tensors (normalize, crop, flip), table rows (standardize).

Per-sample PIL transforms cost about 40% of a small CNN's epoch; doing the same ops once per batch,
on whatever device the batch sits on, makes them nearly free. Random draws come from a CPU
generator the caller seeds, so a run augments identically on CPU and GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device``. To a GPU the copy goes through pinned memory and is queued on the
    stream like a kernel, so the host does not wait for the device (a pageable copy would)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and cut one random (H, W) window per sample."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)  # (B, C, H+2p, W+2p)
    top = to_device(torch.randint(0, 2 * padding + 1, (b,), generator=gen), x.device)  # (B,)
    left = to_device(torch.randint(0, 2 * padding + 1, (b,), generator=gen), x.device)  # (B,)
    rows = (top[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (left[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]  # (B, 1, 1, 1)
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]  # (1, C, 1, 1)
    return padded[batch, chans, rows, cols]  # (B, C, H, W)


def random_hflip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mirror a random half of the batch left-right."""
    flip = to_device(torch.rand(x.shape[0], generator=gen) < 0.5, x.device)  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class BatchTransform:
    """uint8 (B, C, H, W) -> normalized float, with optional crop and flip augmentation.

    Args:
        mean: per-channel mean on the [0, 1] scale.
        std: per-channel std on the [0, 1] scale.
        crop_padding: pad-and-crop augmentation margin; 0 disables it.
        hflip: random horizontal flips.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], crop_padding: int = 0, hflip: bool = False) -> None:
        self.mean = torch.tensor(mean).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std).view(1, -1, 1, 1) * 255
        self.crop_padding = crop_padding
        self.hflip = hflip

    @property
    def augments(self) -> bool:
        return self.crop_padding > 0 or self.hflip

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        if gen is not None and self.crop_padding > 0:
            x = random_crop(x, self.crop_padding, gen)
        if gen is not None and self.hflip:
            x = random_hflip(x, gen)
        if self.mean.device != x.device:  # moved once, not per batch
            self.mean, self.std = to_device(self.mean, x.device), to_device(self.std, x.device)
        return (x.float() - self.mean) / self.std


class FeatureTransform:
    """Float rows (B, F) with NaN for missing values -> standardized rows, a missing value as 0.

    0 is the feature's mean after standardizing, so a missing value is filled with the mean of the
    rows the statistics came from (the clients' training rows: no test row is looked at). A feature
    without spread there (constant, or missing in all of them) is only centred.

    Args:
        mean: per-feature mean of the training rows, missing values left out.
        std: per-feature standard deviation of the same rows.
    """

    augments = False

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1)
        self.std = torch.tensor([s if s > 0 else 1.0 for s in std], dtype=torch.float32).view(1, -1)

    @classmethod
    def fit(cls, rows: torch.Tensor) -> FeatureTransform:
        """Statistics of ``rows`` (N, F), each feature over the rows where it is present."""
        x = rows.double()
        present = ~torch.isnan(x)
        n = present.sum(0).clamp(min=1)
        mean = torch.where(present, x, 0.0).sum(0) / n
        var = torch.where(present, (x - mean) ** 2, 0.0).sum(0) / n
        return cls(mean.tolist(), var.sqrt().tolist())

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        if self.mean.device != x.device:
            self.mean, self.std = to_device(self.mean, x.device), to_device(self.std, x.device)
        return torch.nan_to_num((x.float() - self.mean) / self.std, nan=0.0)  # (B, F)


class Unchanged:
    """Inputs as they are (token ids)."""

    augments = False

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        return x
