"""The federated data module: one source, one partition, one ClientDataModule per client."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, Literal, overload

import numpy as np
import torch

from fedmoe_pl.data.client import ClientDataModule
from fedmoe_pl.data.drift import Drift, Schedule, keep, shift_images
from fedmoe_pl.data.inputs import ImageInput, InputSpec, TabularInput
from fedmoe_pl.data.partition import Natural, Partitioner, assign, scale_counts
from fedmoe_pl.data.sources import Source, SourceData
from fedmoe_pl.data.transforms import BatchTransform, FeatureTransform, Unchanged

log = logging.getLogger(__name__)

SplitConvention = Literal["paper", "pooled"]
PARTITION_STREAM = 1  # SeedSequence key: the partition's random stream, apart from all others


class Shards(Sequence[ClientDataModule]):
    """Every client's shard, cut from the data when first asked for and kept from then on: a client
    that is never sampled or scored costs no copy of its images.

    Args:
        cut: makes client ``i``'s shard.
        train_sizes: each client's training samples.
        test_sizes: each client's test samples.
    """

    def __init__(self, cut: Callable[[int], ClientDataModule], train_sizes: list[int], test_sizes: list[int]) -> None:
        self.cut, self._sizes = cut, (train_sizes, test_sizes)
        self.made: dict[int, ClientDataModule] = {}

    def sizes(self, i: int) -> tuple[int, int]:
        """Client ``i``'s training and test samples, without cutting its shard."""
        if i in self.made:
            return self.made[i].num_train, self.made[i].num_test
        return self._sizes[0][i], self._sizes[1][i]

    def __len__(self) -> int:
        return len(self._sizes[0])

    @overload
    def __getitem__(self, i: int) -> ClientDataModule: ...

    @overload
    def __getitem__(self, i: slice) -> list[ClientDataModule]: ...

    def __getitem__(self, i: int | slice) -> ClientDataModule | list[ClientDataModule]:
        if isinstance(i, slice):
            return [self[k] for k in range(len(self))[i]]
        k = range(len(self))[i]  # IndexError past the end (iteration stops there), negative ids wrap
        if k not in self.made:
            self.made[k] = self.cut(k)
        return self.made[k]


class FederatedDataModule:
    """Owns the data source, its partition into client shards, and the client data modules.

    Args:
        source: where the data comes from (images, table rows or texts).
        partitioner: how classes are spread over clients (``Natural``: one client per site of the data).
        num_clients: N, the number of clients.
        split: ``paper`` partitions the official train and test sets with the same class
            assignment; ``pooled`` (PFLlib/HtFLlib/FL-bench) pools both, partitions the pool and
            splits each client's share into train and test by ``train_fraction``.
        train_fraction: the train share of each client under ``pooled``.
        batch_size: training batch size.
        eval_batch_size: evaluation batch size.
        augment: crop-with-padding and horizontal flips while training. ``None`` turns them on for
            colour data and off for gray images such as digits.
        drift: changes of the clients' data from stated rounds on (:mod:`fedmoe_pl.data.drift`);
            none by default. Each entry is a :class:`Drift` or a mapping of its fields; a list given
            in a later config file or on the command line replaces the earlier list whole (no field
            of an earlier entry carries over).
    """

    def __init__(
        self,
        source: Source,
        partitioner: Partitioner,
        num_clients: int = 10,
        split: SplitConvention = "paper",
        train_fraction: float = 0.75,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        augment: bool | None = None,
        drift: list[Mapping[str, Any] | Drift] | None = None,
    ) -> None:
        if split not in ("paper", "pooled"):
            raise ValueError(f"split={split!r} is not a convention; use 'paper' or 'pooled'")
        if not 0 < train_fraction < 1:
            raise ValueError(f"train_fraction={train_fraction} must lie strictly between 0 and 1")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}")
        self.source, self.partitioner = source, partitioner
        self.num_clients, self.split, self.train_fraction = num_clients, split, train_fraction
        self.batch_size, self.eval_batch_size, self.augment = batch_size, eval_batch_size, augment
        self.drift = [Drift.of(entry) for entry in drift or []]
        self.clients: Sequence[ClientDataModule] = []  # the shards of the first phase (all rounds, without drift)
        self.schedule: Schedule | None = None  # the drift's phases, known after setup
        self._phases: dict[int, Shards] = {}
        self.fingerprint = ""
        self.num_classes = self.in_channels = self.image_size = 0
        self.inputs: InputSpec | None = None  # one sample's description, known after setup
        self.classes: list[str] = []
        self.sites: list[str] | None = None  # the client's site names under the Natural partition

    def setup(self, seed: int) -> None:
        """Load the source and build every client's shard; the partition depends only on ``seed``."""
        data = self.source.load()
        self.num_classes, self.in_channels, self.image_size = data.num_classes, data.in_channels, data.image_size
        self.inputs = data.sample
        self.classes = data.classes or [str(c) for c in range(data.num_classes)]
        self.partitioner.check(data.num_classes, self.num_clients)
        natural = isinstance(self.partitioner, Natural)
        if natural:
            self.sites = Natural.check_sites(data.sites, self.num_clients, type(self.source).__name__)
        if self.drift and not isinstance(data.sample, ImageInput) and any(c.kind == "shift" for c in self.drift):
            raise ValueError(
                f"data.drift: a shift change (rotation, noise, invert) transforms images, but the data gives "
                f"{data.sample.describe()}; use rotate or arrive changes"
            )
        if self.augment and not isinstance(data.sample, ImageInput):
            raise ValueError(
                f"data.augment=true crops and flips images, but the data gives {data.sample.describe()}; "
                "leave data.augment unset (null) or false"
            )
        rng = np.random.default_rng(np.random.SeedSequence([seed, PARTITION_STREAM]))
        if self.split == "paper":
            train_x, train_y, test_x, test_y = data.train_images, data.train_labels, data.test_images, data.test_labels
            if natural:
                train_idx, test_idx = (Natural.split(sites, self.num_clients) for sites in self._sites(data))
            else:
                train_idx, test_idx = self._partition_paper(data, rng)
        else:
            train_x = test_x = torch.cat([data.train_images, data.test_images])
            train_y = test_y = torch.cat([data.train_labels, data.test_labels])
            if natural:
                train_idx, test_idx = self._split_shares(
                    Natural.split(np.concatenate(self._sites(data)), self.num_clients), rng
                )
            else:
                train_idx, test_idx = self._partition_pooled(train_y.numpy(), data.num_classes, rng)
        for i, idx in enumerate(train_idx):
            if len(idx) == 0:
                raise ValueError(
                    f"client {i} received no training samples with num_clients={self.num_clients}; "
                    "lower num_clients or pick a partitioner that spreads classes more widely"
                )
        train_tf, eval_tf = self._transforms(data, train_x, train_idx)
        train_labels, test_labels = train_y.numpy(), test_y.numpy()
        schedule = self.schedule = Schedule(self.drift, self.num_clients)
        schedule.check_classes(data.num_classes)

        def indices(phase: int, i: int) -> tuple[np.ndarray, np.ndarray]:
            source, held = schedule.source(phase, i), schedule.held_back(phase)
            return keep(train_labels, train_idx[source], held), keep(test_labels, test_idx[source], held)

        def shards(phase: int) -> Shards:
            def cut(i: int) -> ClientDataModule:
                tr, te = (torch.from_numpy(idx) for idx in indices(phase, i))
                train_images, test_images = train_x[tr], test_x[te]
                if shifts := schedule.shifts(phase):
                    train_images = shift_images(train_images, shifts, seed, i, 0)
                    test_images = shift_images(test_images, shifts, seed, i, 1)
                train, test = (train_images, train_y[tr]), (test_images, test_y[te])
                return ClientDataModule(train, test, train_tf, eval_tf, self.batch_size, self.eval_batch_size)

            sizes = [tuple(len(idx) for idx in indices(phase, i)) for i in range(self.num_clients)]
            for i, (n_train, _) in enumerate(sizes):
                if n_train == 0:
                    raise ValueError(
                        f"client {i} holds no training samples from round {schedule.starts[phase]} on: every class "
                        f"it holds then is held back by data.drift (classes {sorted(schedule.held_back(phase))}); "
                        "let those classes arrive earlier or hold back fewer"
                    )
            return Shards(cut, [n for n, _ in sizes], [n for _, n in sizes])

        self._phase_shards = shards
        self._phases = {phase: shards(phase) for phase in range(len(schedule))}  # sizes checked; nothing cut yet
        self.clients = self._phases[0]
        self._labels = [(train_labels[tr], test_labels[te]) for tr, te in zip(train_idx, test_idx)]
        self.fingerprint = self._fingerprint(data.identity, train_idx, test_idx)

    def shards(self, round_: int) -> Sequence[ClientDataModule]:
        """Every client's shard in round ``round_`` (the same in every round without drift)."""
        if self.schedule is None or not self._phases:
            raise RuntimeError("call setup(seed) before asking for shards")
        return self._shards_of(self.schedule.phase(round_))

    def before_drift(self, round_: int) -> Sequence[ClientDataModule] | None:
        """The shards the clients held before the latest change in effect at ``round_`` (None before the
        first change): what forgetting is measured on."""
        if self.schedule is None:
            raise RuntimeError("call setup(seed) before asking for shards")
        phase = self.schedule.phase(round_)
        return self._shards_of(phase - 1) if phase else None

    def _shards_of(self, phase: int) -> Shards:
        """A phase's shards; the cut shards of phases two or more behind the latest asked for are let go."""
        shards = self._phases[phase]
        for old in self._phases:
            if 0 < old < phase - 1 and self._phases[old].made:
                self._phases[old] = self._phase_shards(old)
        return shards

    def check_rounds(self, rounds: int) -> None:
        """Refuse a drift schedule with changes after the run's last round."""
        Schedule(self.drift, self.num_clients).check_rounds(rounds)

    def _check_size(self, n: int) -> None:
        if self.num_clients > n:
            raise ValueError(f"num_clients={self.num_clients} exceeds the {n} available samples; lower num_clients")

    def _partition_paper(self, data: SourceData, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
        train_y, test_y = data.train_labels.numpy(), data.test_labels.numpy()
        self._check_size(len(train_y))
        train_counts = self.partitioner.counts(np.bincount(train_y, minlength=data.num_classes), self.num_clients, rng)
        test_counts = scale_counts(train_counts, np.bincount(test_y, minlength=data.num_classes), rng)
        return assign(train_y, train_counts, rng), assign(test_y, test_counts, rng)

    @staticmethod
    def _sites(data: SourceData) -> tuple[np.ndarray, np.ndarray]:
        if data.train_sites is None or data.test_sites is None:
            raise ValueError("the source names sites but not the site of every sample")
        return np.asarray(data.train_sites), np.asarray(data.test_sites)

    def _partition_pooled(
        self, labels: np.ndarray, num_classes: int, rng: np.random.Generator
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        self._check_size(len(labels))
        counts = self.partitioner.counts(np.bincount(labels, minlength=num_classes), self.num_clients, rng)
        return self._split_shares(assign(labels, counts, rng), rng)

    def _split_shares(
        self, shares: list[np.ndarray], rng: np.random.Generator
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Each client's share of the pool, cut into train and test by ``train_fraction``."""
        train_idx, test_idx = [], []
        for share in shares:
            share = rng.permutation(share)
            cut = round(self.train_fraction * len(share))
            train_idx.append(np.sort(share[:cut]))
            test_idx.append(np.sort(share[cut:]))
        return train_idx, test_idx

    def _transforms(self, data: SourceData, train_x: torch.Tensor, train_idx: list[np.ndarray]) -> tuple[Any, Any]:
        """The training and evaluation transforms. Table rows are standardized with the statistics of
        the clients' training rows (``train_x`` at ``train_idx``); images keep the dataset's channel statistics."""
        if isinstance(data.sample, TabularInput):
            features = FeatureTransform.fit(train_x[torch.from_numpy(np.concatenate(train_idx))])
            return features, features
        if not isinstance(data.sample, ImageInput):
            return Unchanged(), Unchanged()
        mean, std = data.channel_stats()
        augment = self.augment if self.augment is not None else data.in_channels == 3
        pad = 4 if augment and data.image_size >= 32 else (2 if augment else 0)
        return BatchTransform(mean, std, crop_padding=pad, hflip=augment), BatchTransform(mean, std)

    def _fingerprint(self, identity: str, train_idx: list[np.ndarray], test_idx: list[np.ndarray]) -> str:
        h = hashlib.sha256(f"{identity}|{self.split}|{self.train_fraction if self.split == 'pooled' else ''}".encode())
        if self.drift:  # (a run without drift keeps its fingerprint)
            h.update(json.dumps([asdict(change) for change in self.drift], sort_keys=True).encode())
        for tr, te in zip(train_idx, test_idx):
            h.update(b"client")
            h.update(tr.tobytes())
            h.update(b"|")
            h.update(te.tobytes())
        return h.hexdigest()[:16]

    def label_counts(self) -> list[dict[str, Any]]:
        """Per-client label counts, labels as strings (the ``partition.json`` layout: a client's
        ``train`` table lists exactly the classes it holds)."""

        def table(labels: np.ndarray) -> dict[str, int]:
            counts = np.bincount(labels, minlength=self.num_classes).tolist()
            return {str(c): n for c, n in enumerate(counts) if n}

        sites = self.sites or []
        return [
            {"id": i, **({"site": sites[i]} if i < len(sites) else {}), "train": table(tr), "test": table(te)}
            for i, (tr, te) in enumerate(self._labels)
        ]

    def sizes(self, cid: int) -> tuple[int, int]:
        """Client ``cid``'s training and test samples (its shard is not cut to count them)."""
        if isinstance(self.clients, Shards):
            return self.clients.sizes(cid)
        return self.clients[cid].num_train, self.clients[cid].num_test

    def report(self) -> dict[str, Any]:
        """The partition as written to ``partition.json``."""
        if not self.clients:
            raise RuntimeError("call setup(seed) before asking for the partition report")
        report = {
            "fingerprint": self.fingerprint,
            "num_classes": self.num_classes,
            "classes": self.classes,
            "clients": self.label_counts(),
        }
        if self.drift:
            report["drift"] = [asdict(change) for change in self.drift]
        return report
