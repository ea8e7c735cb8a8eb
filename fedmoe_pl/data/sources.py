"""Dataset sources: each loads a whole dataset once into memory as tensors (images: uint8).

This module holds the interface and the torchvision datasets; :mod:`fedmoe_pl.data.local_sources`
holds sources that need no download (an image folder, synthetic data).

Holding uint8 (N, C, H, W) tensors rather than PIL images is what makes batched, on-device
augmentation possible later (see :mod:`fedmoe_pl.data.transforms`).
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import pickle
import shutil
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from fedmoe_pl.data.inputs import ImageInput, InputSpec

log = logging.getLogger(__name__)

# Where Debian's `dataset-fashion-mnist` package installs the four original idx files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class SourceData:
    """A dataset in memory: inputs, int64 labels (N,), and its description.

    The inputs keep the name ``*_images`` from when every source gave images: uint8 images
    (N, C, H, W), float32 table rows (N, F) with NaN where a value is missing, or int64 token ids
    (N, L). ``inputs`` describes one sample; left out, the tensors are images. ``train_sites`` /
    ``test_sites`` name the site (a hospital, say) each sample comes from, where the data has
    sites, for the ``Natural`` partition; ``sites`` are their names.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    identity: str  # names the data for the partition fingerprint
    classes: list[str] | None = None  # class names, where the source has them
    inputs: InputSpec | None = None
    train_sites: np.ndarray | None = None  # (N,) site index of each training sample
    test_sites: np.ndarray | None = None
    sites: list[str] | None = None

    def __post_init__(self) -> None:
        if self.inputs is None:
            self.inputs = ImageInput(int(self.train_images.shape[1]), int(self.train_images.shape[-1]))

    @property
    def sample(self) -> InputSpec:
        """The description of one input sample (``inputs``, filled in)."""
        assert self.inputs is not None  # set in __post_init__
        return self.inputs

    @property
    def in_channels(self) -> int:
        """Image channels (0 for inputs that are not images)."""
        return self.sample.channels if isinstance(self.sample, ImageInput) else 0

    @property
    def image_size(self) -> int:
        """Image side (0 for inputs that are not images)."""
        return self.sample.size if isinstance(self.sample, ImageInput) else 0

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training images, on the [0, 1] scale."""
        x = self.train_images.float().div_(255).transpose(0, 1).flatten(1)  # (C, N*H*W)
        return x.mean(1).tolist(), x.std(1).tolist()


class Source(ABC):
    """Something that can produce a :class:`SourceData`."""

    @abstractmethod
    def load(self) -> SourceData: ...


def _missing(name: str, looked: Path, how: str) -> FileNotFoundError:
    return FileNotFoundError(f"{name} was not found under data root {str(looked)!r} and download is off. {how}")


class _TorchvisionSource(Source):
    """Shared loading for torchvision's dataset classes."""

    name = ""
    folder = ""  # what torchvision expects below root

    def __init__(self, root: str = "data", download: bool = False) -> None:
        self.root = Path(root)
        self.download = download

    def _dataset(self, train: bool):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def _how_to_get(self) -> str:
        return (
            f"Set download: true on a machine with internet, or place torchvision's files in "
            f"{str(self.root / self.folder)!r}."
        )

    def _damaged(self, err: BaseException) -> ValueError:
        return ValueError(
            f"{self.name} under {str(self.root / self.folder)!r} cannot be read ({type(err).__name__}: {err}); "
            f"a file there is truncated or damaged. Delete {str(self.root / self.folder)!r} and fetch the data again"
        )

    @contextmanager
    def _preparing(self) -> Iterator[None]:
        """Hold the data root's lock while files may be written (a download, an unpacking).

        Runs that start together on one data root (a job array) then prepare the files once; the
        others wait and read what the first one wrote. Reading files already in place takes no lock,
        so a read-only data root works.
        """
        if not self._needs_writing():
            yield
            return
        target, lock_file = self.root / self.folder, self.root / f".{self.name}.lock"
        new_folders = [p for p in (target, *target.parents) if not p.exists()]  # deepest first
        lock_existed = lock_file.exists()
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(lock_file):
                yield
        except BaseException:  # a failed preparation leaves the data root as it found it
            if not lock_existed:
                lock_file.unlink(missing_ok=True)
            for folder in new_folders:
                with contextlib.suppress(OSError):  # not empty: another run wrote there meanwhile
                    folder.rmdir()
            raise

    def _needs_writing(self) -> bool:
        return self.download

    def _prepare(self) -> None:
        """Put files in place before torchvision reads them (under the data root's lock if writing)."""

    def _to_tensors(self, ds) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
        data = torch.as_tensor(np.asarray(ds.data))
        images = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)
        return images.contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)

    def load(self) -> SourceData:
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(
                f"data root {str(self.root)!r} is a file, not a folder; point data.source.init_args.root at a folder"
            )
        with self._preparing():
            self._prepare()
            try:
                train, test = self._dataset(True), self._dataset(False)
            except RuntimeError as err:
                if "download=True" not in str(err):
                    raise self._damaged(err) from err
                raise _missing(self.name, self.root, self._how_to_get()) from err
            except (OSError, EOFError, ValueError, IndexError, pickle.UnpicklingError) as err:
                raise self._damaged(err) from err
        train_x, train_y = self._to_tensors(train)
        test_x, test_y = self._to_tensors(test)
        classes = [str(c) for c in train.classes]
        return SourceData(train_x, train_y, test_x, test_y, len(classes), identity=self.name.lower(), classes=classes)


class CIFAR10(_TorchvisionSource):
    """CIFAR-10 through torchvision (``root/cifar-10-batches-py``)."""

    name, folder = "CIFAR10", "cifar-10-batches-py"

    def _dataset(self, train: bool):  # type: ignore[no-untyped-def]
        from torchvision.datasets import CIFAR10 as TV

        return TV(str(self.root), train=train, download=self.download)


class CIFAR100(_TorchvisionSource):
    """CIFAR-100 (fine labels) through torchvision (``root/cifar-100-python``)."""

    name, folder = "CIFAR100", "cifar-100-python"

    def _dataset(self, train: bool):  # type: ignore[no-untyped-def]
        from torchvision.datasets import CIFAR100 as TV

        return TV(str(self.root), train=train, download=self.download)


class MNIST(_TorchvisionSource):
    """MNIST through torchvision (``root/MNIST/raw``)."""

    name, folder = "MNIST", "MNIST/raw"

    def _dataset(self, train: bool):  # type: ignore[no-untyped-def]
        from torchvision.datasets import MNIST as TV

        return TV(str(self.root), train=train, download=self.download)


class FashionMNIST(_TorchvisionSource):
    """Fashion-MNIST through torchvision (``root/FashionMNIST/raw``).

    When the files are neither under ``root`` nor to be downloaded, the original files installed
    by Debian's ``dataset-fashion-mnist`` package are unpacked into ``root`` and used instead.

    Args:
        root: data root.
        download: let torchvision download the files.
        system_dir: where a system package keeps the four ``.gz`` idx files.
    """

    name, folder = "FashionMNIST", "FashionMNIST/raw"
    files = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

    def __init__(self, root: str = "data", download: bool = False, system_dir: str = str(DEBIAN_FASHION_MNIST)) -> None:
        super().__init__(root, download)
        self.system_dir = Path(system_dir)

    def _how_to_get(self) -> str:
        return (
            f"Set download: true on a machine with internet, install Debian's package "
            f"(apt-get install dataset-fashion-mnist, which puts the files in "
            f"{str(self.system_dir)!r}), or place the four idx files in "
            f"{str(self.root / self.folder)!r}."
        )

    def _needs_writing(self) -> bool:
        if self.download:
            return True
        unpacked = all((self.root / self.folder / f).exists() for f in self.files)
        return not unpacked and all((self.system_dir / f"{f}.gz").exists() for f in self.files)

    def _prepare(self) -> None:
        raw = self.root / self.folder
        if self.download or all((raw / f).exists() for f in self.files):
            return  # also when another run unpacked them while this one waited for the lock
        if not all((self.system_dir / f"{f}.gz").exists() for f in self.files):
            return
        log.warning("Fashion-MNIST: using the system package's files from %s", self.system_dir)
        raw.mkdir(parents=True, exist_ok=True)
        for f in self.files:
            if (raw / f).exists():
                continue
            tmp = raw / f"{f}.partial-{os.getpid()}"
            try:
                with gzip.open(self.system_dir / f"{f}.gz", "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except (OSError, EOFError) as err:
                tmp.unlink(missing_ok=True)
                raise ValueError(
                    f"{str(self.system_dir / f'{f}.gz')!r} cannot be unpacked ({type(err).__name__}: {err}); it is "
                    "truncated or damaged: reinstall the dataset-fashion-mnist package"
                ) from err
            tmp.replace(raw / f)

    def _dataset(self, train: bool):  # type: ignore[no-untyped-def]
        from torchvision.datasets import FashionMNIST as TV

        return TV(str(self.root), train=train, download=self.download)


class FileSource(Source):
    """A source read from a few files that sit in ``root/<folder>`` or in ``root`` itself, fetched from
    ``url`` (under the data root's lock, each through a temporary file) when missing and ``download``.

    Subclasses set ``name`` (for messages), ``folder``, ``files``, ``url`` and ``what`` (the files,
    as a user would look for them) and read :meth:`located` files in ``load``.
    """

    name = ""
    folder = ""
    files: tuple[str, ...] = ()
    url = ""
    what = ""

    def __init__(self, root: str = "data", download: bool = False) -> None:
        self.root, self.download = Path(root), download

    def _folder(self) -> Path:
        """``root/<folder>`` when it holds any of the files (or ``root`` holds none), else ``root``."""
        nested = self.root / self.folder
        if any((nested / f).exists() for f in self.files) or not any((self.root / f).exists() for f in self.files):
            return nested
        return self.root

    def located(self) -> Path:
        """The folder holding every file, fetched first if allowed; a missing file is named."""
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(
                f"data root {str(self.root)!r} is a file, not a folder; point data.source.init_args.root at a folder"
            )
        folder = self._folder()
        missing = [f for f in self.files if not (folder / f).exists()]
        if missing and not self.download:
            raise FileNotFoundError(
                f"{self.name}: {', '.join(missing)} not found in {str(folder)!r} and download is off. Set download: "
                f"true on a machine with internet, or place {self.what} in {str(self.root / self.folder)!r}"
            )
        if missing:
            self._fetch(folder, missing)
        return folder

    def _fetch(self, folder: Path, missing: list[str]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(self.root / f".{self.folder}.lock"):
            for name in missing:
                if (folder / name).exists():
                    continue  # another run fetched it while this one waited
                tmp = folder / f"{name}.partial-{os.getpid()}"
                log.warning("%s: downloading %s", self.name, self.url + name)
                try:
                    with urllib.request.urlopen(self.url + name, timeout=120) as response:
                        tmp.write_bytes(response.read())
                except OSError as err:
                    tmp.unlink(missing_ok=True)
                    raise FileNotFoundError(
                        f"{name} could not be downloaded from {self.url} ({err}); place {self.what} in "
                        f"{str(folder)!r} by hand"
                    ) from err
                tmp.replace(folder / name)
