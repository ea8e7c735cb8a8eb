"""Runs launched by a W&B sweep agent (``wandb agent``), recognised by the environment it sets.

The agent starts ``fedmoe-pl fit`` with ``WANDB_SWEEP_ID`` and ``WANDB_RUN_ID`` set; the run id
is the agent's, not one the library chooses, and it stays the same when the sweep hands out a
preempted run again. So a sweep run's directory is derived from it: every run of a sweep gets its
own, and a run handed out again finds its checkpoint there and resumes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class SweepRun:
    """The sweep and run ids of a process launched by a W&B sweep agent."""

    sweep_id: str
    run_id: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> SweepRun | None:
        sweep, run = environ.get("WANDB_SWEEP_ID"), environ.get("WANDB_RUN_ID")
        return cls(sweep, run) if sweep and run else None

    def run_dir(self, configured: str | Path) -> Path:
        """``<parent of the configured run_dir>/sweeps/<sweep id>/<run id>``."""
        return Path(configured).parent / "sweeps" / self.sweep_id / self.run_id
