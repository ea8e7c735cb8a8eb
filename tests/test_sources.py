import logging
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_idx

from fedmoe_pl.data import CIFAR10, CIFAR100, FashionMNIST, FederatedDataModule, ImageFolder, Pathological
from fedmoe_pl.data.sources import DEBIAN_FASHION_MNIST


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Synthetic stand-ins cannot match the official MD5 sums; skip only that check."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)


def write_cifar(root: Path, hundred: bool, per_file: int = 20) -> None:
    rng = np.random.default_rng(0)
    classes = 100 if hundred else 10
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    key = "fine_labels" if hundred else "labels"
    files = ["train", "test"] if hundred else [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    for name in files:
        n = per_file * (5 if hundred and name == "train" else 1)
        batch = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: rng.integers(0, classes, n).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = (
        {"fine_label_names": [f"c{i}" for i in range(100)]}
        if hundred
        else {"label_names": [f"c{i}" for i in range(10)]}
    )
    (folder / ("meta" if hundred else "batches.meta")).write_bytes(pickle.dumps(meta))


@pytest.mark.parametrize(("source", "hundred", "classes"), [(CIFAR10, False, 10), (CIFAR100, True, 100)])
def test_cifar_loads_through_torchvision_from_the_official_layout(tmp_path, no_md5, source, hundred, classes) -> None:
    write_cifar(tmp_path, hundred)
    data = source(root=str(tmp_path)).load()
    assert data.num_classes == classes
    assert data.train_images.shape == (100, 3, 32, 32) and data.train_images.dtype == torch.uint8
    assert data.test_images.shape == (20, 3, 32, 32)
    # The pickled rows are channel-major (R plane, G plane, B plane): check one pixel survived.
    folder = tmp_path / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    first = pickle.loads((folder / ("train" if hundred else "data_batch_1")).read_bytes())
    assert data.train_images[0, 1, 0, 5].item() == first["data"][0][1024 + 5]


def test_missing_cifar_says_where_it_looked_and_how_to_get_it(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=rf"CIFAR10 was not found under data root '{tmp_path}'.*download: true"):
        CIFAR10(root=str(tmp_path)).load()


def test_fashion_mnist_reads_idx_files_under_the_root(tmp_path) -> None:
    write_idx(tmp_path / "FashionMNIST" / "raw")
    data = FashionMNIST(root=str(tmp_path), system_dir=str(tmp_path / "none")).load()
    assert data.train_images.shape == (30, 1, 28, 28)
    assert data.test_labels.tolist() == list(range(10))
    assert data.classes is not None and data.classes[0] == "T-shirt/top" and data.classes[9] == "Ankle boot"


def test_fashion_mnist_falls_back_on_the_system_package_and_says_so(tmp_path, caplog) -> None:
    write_idx(tmp_path / "system", compress=True)
    with caplog.at_level(logging.WARNING):
        data = FashionMNIST(root=str(tmp_path / "root"), system_dir=str(tmp_path / "system")).load()
    assert data.train_images.shape == (30, 1, 28, 28)
    assert "system package" in caplog.text


def test_unpacking_waits_for_the_data_roots_lock_and_then_reuses_the_files(tmp_path) -> None:
    from filelock import FileLock

    write_idx(tmp_path / "system", compress=True)
    root = tmp_path / "root"
    root.mkdir()
    result: dict = {}
    source = FashionMNIST(root=str(root), system_dir=str(tmp_path / "system"))
    with FileLock(root / ".FashionMNIST.lock"):  # another run is unpacking
        loader = threading.Thread(target=lambda: result.update(data=source.load()))
        loader.start()
        loader.join(timeout=1.0)
        assert loader.is_alive() and not (root / "FashionMNIST").exists()  # it waits, writing nothing
    loader.join(timeout=30)
    assert result["data"].train_images.shape == (30, 1, 28, 28)


def test_missing_fashion_mnist_names_the_root_and_the_package(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"FashionMNIST was not found.*dataset-fashion-mnist"):
        FashionMNIST(root=str(tmp_path), system_dir=str(tmp_path / "none")).load()


@pytest.mark.real_data
@pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian's dataset-fashion-mnist package is not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_paper_split_gives_each_client_its_two_classes(tmp_path) -> None:
    dm = FederatedDataModule(FashionMNIST(root=str(tmp_path)), Pathological(2), 10, split="paper")
    dm.setup(0)
    report = dm.report()
    for row in report["clients"]:
        assert set(row["train"]) == set(row["test"])
        assert len(row["train"]) == 2
    assert sum(sum(r["train"].values()) for r in report["clients"]) == 60_000
    assert sum(sum(r["test"].values()) for r in report["clients"]) == 10_000


def write_folder(root: Path, classes: list[str], per_class: int = 3) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def test_image_folder_loads_train_and_test(tmp_path) -> None:
    write_folder(tmp_path / "train", ["cat", "dog"], 4)
    write_folder(tmp_path / "test", ["cat", "dog"], 2)
    data = ImageFolder(str(tmp_path)).load()
    assert data.num_classes == 2 and data.classes == ["cat", "dog"]
    assert data.train_images.shape == (8, 3, 32, 32)
    assert data.test_labels.tolist() == [0, 0, 1, 1]


def test_image_folder_with_different_class_folders_is_refused(tmp_path) -> None:
    write_folder(tmp_path / "train", ["cat", "dog"])
    write_folder(tmp_path / "test", ["cat", "eel"])
    with pytest.raises(ValueError, match=r"train classes \['cat', 'dog'\] differ from test classes \['cat', 'eel'\]"):
        ImageFolder(str(tmp_path)).load()
