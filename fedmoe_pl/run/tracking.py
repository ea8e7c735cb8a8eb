"""Weights & Biases logging: offline unless asked otherwise (or run by a sweep agent), never waiting on the network."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np

from fedmoe_pl.cluster.sweep import SweepRun
from fedmoe_pl.run.rundir import HISTOGRAMS, PER_CLIENT, PER_CLIENT_CLASS

log = logging.getLogger(__name__)


@dataclass
class WandbConfig:
    """Weights & Biases settings.

    Args:
        mode: ``offline`` (the run is stored in the run directory, sync it later with ``wandb
            sync``), ``online``, or ``disabled``. Unset, it is ``offline``, or ``online`` for a
            run launched by a W&B sweep agent (the sweep needs its metrics). The WANDB_MODE
            environment variable, when set, wins over this value.
        project: W&B project name.
        entity: W&B team or user.
        name: run name; defaults to the run directory's name.
        group: run group, for example a sweep or a paper-grid cell.
        tags: run tags.
    """

    mode: Literal["offline", "online", "disabled"] | None = None
    project: str = "fedmoe-pl"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)


def _server() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")


def _server_reachable(timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the W&B server opens within ``timeout`` seconds.

    wandb.init would otherwise wait for its own, much longer, timeout before failing the run.
    """
    url = urlsplit(_server())
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_mode(configured: str | None, environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """The W&B mode of a run and what chose it: WANDB_MODE, then ``wandb.mode``, then the default."""
    if environ.get("WANDB_MODE"):
        return environ["WANDB_MODE"], "WANDB_MODE"
    if configured is not None:
        return configured, "wandb.mode"
    if SweepRun.from_env(environ) is not None:
        return "online", "a W&B sweep agent launched the run"
    return "offline", "the default"


class WandbTracker:
    """One W&B run per experiment; metrics logged with ``step = round``."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict[str, Any], run_id: str | None = None) -> None:
        self.mode, chosen_by = resolve_mode(cfg.mode)
        sweep = SweepRun.from_env()
        if sweep is not None and self.mode != "online":
            log.warning(
                "launched by W&B sweep %s, but %s sets W&B to %s: the sweep receives no metrics from "
                "this run and may hand its parameters out again. Unset it for sweep runs",
                sweep.sweep_id,
                chosen_by,
                self.mode,
            )
        self.run: Any = None
        if self.mode == "disabled":
            return
        import wandb

        if self.mode == "online" and not _server_reachable():
            log.warning("W&B server %s cannot be reached: logging offline; upload later with `wandb sync`", _server())
            self.mode = "offline"
        try:
            self.run = self._init(wandb, cfg, run_dir, config, run_id)
        except Exception as err:
            if self.mode != "online":
                raise
            log.warning("W&B online start failed (%s): logging offline; upload later with `wandb sync`", err)
            self.mode = "offline"
            self.run = self._init(wandb, cfg, run_dir, config, run_id)

    def _init(self, wandb: Any, cfg: WandbConfig, run_dir: Path, config: dict[str, Any], run_id: str | None) -> Any:
        settings = (
            wandb.Settings(silent=True, init_timeout=60) if self.mode == "online" else wandb.Settings(silent=True)
        )
        return wandb.init(
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
        self,
        metrics: dict[str, Any],
        step: int,
        tables: dict[str, tuple[list[Any], list[list[Any]]]] | None = None,
        histograms: dict[str, dict[str, list[int]]] | None = None,
    ) -> None:
        """Log scalars, (columns, rows) tables and per-client histograms over [0, 1] in one W&B step."""
        if self.run is None:
            return
        payload = dict(metrics)
        if tables or histograms:
            import wandb

            payload.update({key: wandb.Table(columns=cols, data=rows) for key, (cols, rows) in (tables or {}).items()})
            for key, per_client in (histograms or {}).items():
                for client, counts in per_client.items():
                    edges = np.linspace(0, 1, len(counts) + 1)
                    payload[f"{key}/{client}"] = wandb.Histogram(np_histogram=(np.asarray(counts), edges))
        self.run.log(payload, step=step)

    def log_round(self, record: dict[str, Any], model_names: list[str]) -> None:
        """One round's record at ``step = round``: scalars; per-client values as ``key/client`` and as
        the ``clients`` table; per-(client, class) values as the ``by_class`` table (a column each);
        histograms as W&B histograms, ``key/client``."""
        flat = round_scalars(record)
        per_client = record.get(PER_CLIENT, {})
        tables = {}
        if per_client:
            ids = sorted({int(c) for values in per_client.values() for c in values})
            rows = [[c, model_names[c], *(values.get(str(c)) for values in per_client.values())] for c in ids]
            tables["clients"] = (["client", "model", *per_client], rows)
        by_class = record.get(PER_CLIENT_CLASS, {})
        if by_class:
            cells = sorted({(int(c), int(k)) for values in by_class.values() for c, row in values.items() for k in row})
            rows = [
                [c, model_names[c], k, *(values.get(str(c), {}).get(str(k)) for values in by_class.values())]
                for c, k in cells
            ]
            tables["by_class"] = (["client", "model", "class", *by_class], rows)
        self.log(flat, step=record["round"], tables=tables, histograms=record.get(HISTOGRAMS, {}))

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def mark_preempting(self) -> None:
        """Tell W&B the run stopped to be resumed (a sweep then hands it out again)."""
        if self.run is not None:
            self.run.mark_preempting()

    def finish(self, exit_code: int = 0) -> None:
        """End the W&B run; a non-zero ``exit_code`` marks it failed (or interrupted) in W&B."""
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def round_scalars(record: dict[str, Any]) -> dict[str, Any]:
    """A round's record as scalars (``round`` left out: it is the step): its numbers, the counts of
    dropped and failed clients, and per-client values as ``key/client``."""
    flat = {k: v for k, v in record.items() if isinstance(v, int | float | None) and k != "round"}
    flat.update(num_dropped=len(record.get("dropped", [])), num_failed=len(record.get("failed", [])))
    for key, values in record.get(PER_CLIENT, {}).items():
        flat.update({f"{key}/{k}": v for k, v in values.items()})
    return flat
