"""Small builders shared by the tests: configs and data files in the real on-disk formats."""

from __future__ import annotations

import gzip
import json
import socket
import struct
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedmoe_pl.run.tracking import WandbTracker


def tiny_config(tmp_path: Path, **federation: Any) -> Path:
    """3 clients with 2 classes each on synthetic 16x16 data, 2 rounds, heterogeneous zoo."""
    cfg = {
        "seed_everything": 7,
        "data": {
            "source": {
                "class_path": "fedmoe_pl.data.Synthetic",
                "init_args": {"num_classes": 6, "train_per_class": 40},
            },
            "partitioner": {"class_path": "fedmoe_pl.data.Pathological", "init_args": {"classes_per_client": 2}},
            "num_clients": 3,
            "batch_size": 16,
        },
        "client": {"zoo": ["cnn5", "cnn4", "cnn3"], "lr": 0.05},
        "algorithm": {"class_path": "fedmoe_pl.algorithms.PFedMoE", "init_args": {"gate_hidden": 16}},
        "federation": {"rounds": 2, "run_dir": str(tmp_path / "run"), **federation},
        "trainer": {"accelerator": "cpu"},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_idx(folder: Path, n_train: int = 30, n_test: int = 10, compress: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = struct.pack(">IIII", 2051, n, 28, 28) + rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes()
        labels = struct.pack(">II", 2049, n) + (np.arange(n) % 10).astype(np.uint8).tobytes()
        for kind, blob in (("images-idx3", images), ("labels-idx1", labels)):
            name = f"{prefix}-{kind}-ubyte"
            if compress:
                (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
            else:
                (folder / name).write_bytes(blob)


def overlay(tmp_path: Path, name: str, values: dict[str, Any]) -> Path:
    """A YAML overlay file, for a second ``--config``."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def fashion_overlay(tmp_path: Path, root: Path, system_dir: Path) -> Path:
    """Use Fashion-MNIST (idx files from ``write_idx``) instead of the synthetic source."""
    source = {
        "class_path": "fedmoe_pl.data.FashionMNIST",
        "init_args": {"root": str(root), "system_dir": str(system_dir)},
    }
    return overlay(tmp_path, "fashion", {"data": {"source": source, "batch_size": 32}})


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every file and folder under ``folder`` (lock files included) with its bytes, None for a folder:
    to show that a command changed nothing, not even by creating an empty folder or lock."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
        if p.is_file() or p.is_dir()
    }


def client_states(run: Path) -> dict[int, dict]:
    """The client states a run's last checkpoint names: every client a round has changed (or all of them,
    in a checkpoint from before client files)."""
    import torch

    clients = torch.load(run / "last.ckpt", weights_only=False)["clients"]
    if isinstance(clients, list):
        return dict(enumerate(clients))
    return {cid: torch.load(run / "clients" / f"{cid}.r{v}.pt") for cid, v in clients["version"].items()}


def assert_same_run(a: Path, b: Path) -> None:
    """Two run directories hold the same results: per-round accuracies, losses and every client's state.

    A disk client store holds files only for clients that have trained; those must match.
    """
    import torch

    ma, mb = ([json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] for run in (a, b))
    assert [m["per_client"]["client_acc"] for m in ma] == [m["per_client"]["client_acc"] for m in mb]
    assert [m["train_loss"] for m in ma] == [m["train_loss"] for m in mb]
    sa = torch.load(a / "last.ckpt", weights_only=False)
    sb = torch.load(b / "last.ckpt", weights_only=False)
    assert sa["round"] == sb["round"]
    ca, cb = client_states(a), client_states(b)
    assert set(ca) <= set(cb) or set(cb) <= set(ca)
    assert set(ca) & set(cb)
    for cid in set(ca) & set(cb):
        assert all(torch.equal(ca[cid][k], cb[cid][k]) for k in ca[cid]), f"client {cid} differs"


class RecordingTracker(WandbTracker):
    """A W&B tracker without a W&B run that records each ``log``: (metrics, step, tables, histograms)."""

    def __init__(self) -> None:
        self.run = None
        self.calls: list[tuple[dict, int, dict, dict]] = []

    def log(self, metrics, step, tables=None, histograms=None) -> None:
        self.calls.append((metrics, step, tables or {}, histograms or {}))
