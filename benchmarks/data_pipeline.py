"""Time one client's training batches: the data module against a hand-written tensor loop.

Both paths slice the same in-memory uint8 tensors and apply the same ops (random crop with
padding, horizontal flip, normalization); the ratio shows what the data module's structure costs.

    python benchmarks/data_pipeline.py [--samples 5000] [--batch-size 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedmoe_pl.data import IID, FederatedDataModule, Synthetic
from fedmoe_pl.data.transforms import random_crop, random_hflip


def through_module(client) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for x, _ in client.train_batches():
        x.sum()  # touch the batch, as a model would
    return time.perf_counter() - start


def by_hand(
    images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean: torch.Tensor, std: torch.Tensor
) -> float:
    gen, aug = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    start = time.perf_counter()
    order = torch.randperm(len(labels), generator=gen)
    for lo in range(0, len(labels), batch_size):
        idx = order[lo : lo + batch_size]
        x, _ = images[idx], labels[idx]
        x = random_hflip(random_crop(x, 4, aug), aug)
        x = (x.float() - mean) / std
        x.sum()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=5000, help="training samples of the client")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    source = Synthetic(num_classes=10, channels=3, image_size=32, train_per_class=args.samples // 10, test_per_class=1)
    data = FederatedDataModule(source, IID(), num_clients=1, batch_size=args.batch_size)  # colour: augment on
    data.setup(0)
    client = data.clients[0]
    assert client.train_transform.augments, "default augmentation should be on for colour 32x32 data"
    mean, std = client.train_transform.mean, client.train_transform.std
    module_t, hand_t = [], []
    through_module(client), by_hand(client.train_images, client.train_labels, args.batch_size, mean, std)  # warm up
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        module_t.append(through_module(client))
        hand_t.append(by_hand(client.train_images, client.train_labels, args.batch_size, mean, std))
    m, h = min(module_t), min(hand_t)
    print(f"samples={args.samples} batch_size={args.batch_size} repeats={args.repeats} (best of each)")
    print(f"data module : {m * 1e3:8.1f} ms/epoch")
    print(f"hand loop   : {h * 1e3:8.1f} ms/epoch")
    print(f"ratio       : {m / h:8.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
