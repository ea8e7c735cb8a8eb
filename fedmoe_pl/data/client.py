"""One client's shard as a LightningDataModule over in-memory uint8 tensors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import torch

from fedmoe_pl.data.transforms import BatchTransform, to_device


class TensorBatches:
    """Iterate over (images, labels) batches sliced from in-memory tensors.

    A DataLoader would index, collate and re-stack every sample; slicing whole batches out of the
    tensors does the same job in one gather.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle_seed: int | None = None,
        drop_last: bool = False,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.shuffle_seed = shuffle_seed
        self.drop_last = drop_last
        self._gen = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        # Drawn on the CPU (the generator's device), moved once per epoch to where the shard lives.
        order = None if self._gen is None else to_device(torch.randperm(n, generator=self._gen), self.images.device)
        for b in range(len(self)):
            lo, hi = b * self.batch_size, min((b + 1) * self.batch_size, n)
            if order is None:
                yield self.images[lo:hi], self.labels[lo:hi]
            else:
                idx = order[lo:hi]
                yield self.images[idx], self.labels[idx]


class ClientDataModule(L.LightningDataModule):
    """A client's training and test shard.

    Batches leave the loader as uint8 and are normalized (and, in training, augmented) in
    ``on_after_batch_transfer``, i.e. on the accelerator. The federation sets ``shuffle_seed``
    before every local fit so shuffling and augmentation are a pure function of (seed, round,
    client): a resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(
        self,
        train: tuple[torch.Tensor, torch.Tensor],
        test: tuple[torch.Tensor, torch.Tensor],
        train_transform: BatchTransform,
        eval_transform: BatchTransform,
        batch_size: int = 64,
        eval_batch_size: int = 512,
    ) -> None:
        super().__init__()
        self.train_images, self.train_labels = train
        self.test_images, self.test_labels = test
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.shuffle_seed = 0
        self._aug_gen = torch.Generator()

    def keep_on(self, device: torch.device | str) -> None:
        """Keep the shard's uint8 tensors on ``device`` from now on, so no batch is copied there step by step."""
        device = torch.device(device)
        if self.train_images.device != device:
            self.train_images, self.train_labels = self.train_images.to(device), self.train_labels.to(device)
            self.test_images, self.test_labels = self.test_images.to(device), self.test_labels.to(device)

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    @property
    def num_test(self) -> int:
        return len(self.test_labels)

    def train_dataloader(self) -> TensorBatches:
        # One seed drives both the order and the augmentation draws of this fit.
        self._aug_gen.manual_seed(self.shuffle_seed + 1)
        return TensorBatches(self.train_images, self.train_labels, self.batch_size, self.shuffle_seed)

    def test_dataloader(self) -> TensorBatches:
        return TensorBatches(self.test_images, self.test_labels, self.eval_batch_size)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        training = self.trainer is not None and self.trainer.training
        return self.prepare_batch(batch, training)

    def prepare_batch(
        self, batch: tuple[torch.Tensor, torch.Tensor], training: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 batch -> normalized float batch, augmented when ``training``."""
        images, labels = batch
        if training:
            return self.train_transform(images, self._aug_gen), labels
        return self.eval_transform(images), labels

    def train_batches(self, device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of augmented, normalized training batches, as a local fit sees them."""
        for images, labels in self.train_dataloader():
            yield self.prepare_batch((images.to(device), labels.to(device)), training=True)

    def eval_batches(self, device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalized test batches for evaluation outside a Trainer."""
        for images, labels in self.test_dataloader():
            yield self.prepare_batch((images.to(device), labels.to(device)), training=False)
