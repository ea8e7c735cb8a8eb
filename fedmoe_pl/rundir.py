"""The run directory: everything needed to understand a run and to resume it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "last.ckpt"


def _atomic_write_bytes(path: Path, write: Any) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class RunDirectory:
    """Files of one run: config, partition, per-round metrics, summary and the last checkpoint."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    def write_text(self, name: str, text: str) -> None:
        _atomic_write_bytes(self.path / name, lambda fh: fh.write(text.encode()))

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, json.dumps(obj, indent=2) + "\n")

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_round: int) -> None:
        """Drop lines of rounds after ``last_round`` (written after the last checkpoint)."""
        kept = [r for r in self.read_metrics() if r["round"] <= last_round]
        self.write_text("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        _atomic_write_bytes(self.checkpoint_path, lambda fh: torch.save(state, fh))

    @staticmethod
    def load_checkpoint(path: str | Path) -> dict[str, Any]:
        """Load a checkpoint from a run directory or a checkpoint file."""
        path = Path(path)
        file = path / CHECKPOINT if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(
                f"no checkpoint at {str(file)!r}; --resume takes a run directory holding "
                f"{CHECKPOINT} or the path of a checkpoint file"
            )
        return torch.load(file, map_location="cpu", weights_only=False)  # type: ignore[no-any-return]
