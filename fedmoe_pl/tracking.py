"""Weights & Biases logging, offline unless asked otherwise, never waiting on the network."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


@dataclass
class WandbConfig:
    """Weights & Biases settings.

    Args:
        mode: ``offline`` (default: the run is stored in the run directory, sync it later with
            ``wandb sync``), ``online``, or ``disabled``. The WANDB_MODE environment variable,
            when set, wins over this value.
        project: W&B project name.
        entity: W&B team or user.
        name: run name; defaults to the run directory's name.
        group: run group, for example a sweep or a paper-grid cell.
        tags: run tags.
    """

    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "fedmoe-pl"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


class WandbTracker:
    """One W&B run per experiment; metrics logged with ``step = round``."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict[str, Any], run_id: str | None = None) -> None:
        self.mode = os.environ.get("WANDB_MODE", cfg.mode)
        self.run: Any = None
        if self.mode == "disabled":
            return
        import wandb

        settings = (
            wandb.Settings(silent=True, init_timeout=90) if self.mode == "online" else wandb.Settings(silent=True)
        )
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_dir.name,
            group=cfg.group,
            tags=cfg.tags,
            dir=str(run_dir),
            mode=self.mode,  # type: ignore[arg-type]
            config=config,
            id=run_id,
            resume="allow" if run_id else None,
            settings=settings,
        )

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else str(self.run.id)

    def log(
        self, metrics: dict[str, Any], step: int, tables: dict[str, tuple[list[Any], list[list[Any]]]] | None = None
    ) -> None:
        """Log scalars and (columns, rows) tables in one W&B step."""
        if self.run is None:
            return
        payload = dict(metrics)
        if tables:
            import wandb

            payload.update({key: wandb.Table(columns=cols, data=rows) for key, (cols, rows) in tables.items()})
        self.run.log(payload, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
