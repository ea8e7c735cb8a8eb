"""The Lightning Trainer arguments a local fit honours: the ``trainer`` section of a config.

The federation owns everything else a Trainer could be told (one device, the epochs, no logging,
no checkpoints, no validation), so ``--help`` offers only these and any other key is an error
before anything runs. Clients optimize manually (a plain SGD step), so gradient clipping and
accumulation are applied by the client's own step, the same way in both executors.

This module imports neither torch nor Lightning: the command line builds its parser from it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

# Lightning's precision names, with the short forms it also accepts.
PRECISIONS = (
    "64-true",
    "32-true",
    "16-true",
    "bf16-true",
    "16-mixed",
    "bf16-mixed",
    "64",
    "32",
    "16",
    "bf16",
)
FULL_PRECISION = (None, "32-true", "32", 32)

# What the federation tells every Trainer it builds (a local fit, or the probe that resolves the
# device): it logs, checkpoints, validates and reports progress itself. ``devices``, ``max_epochs``
# and ``plugins`` are the executor's, per fit.
FEDERATION_OWNED: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
}

# Settings the client's manual step applies; the rest go to the Trainer of a sequential fit.
STEP_KEYS = ("gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches")


@dataclass
class TrainerSettings:
    """Trainer arguments of every client's local fit.

    Args:
        accelerator: ``auto`` (a GPU when PyTorch sees one, else the CPU), ``cpu``, ``gpu``/``cuda`` or ``mps``.
        precision: Lightning's precision (``32-true`` when unset; ``bf16-mixed``, ``16-mixed``, ...).
        deterministic: ask PyTorch for deterministic algorithms (Lightning's ``deterministic``).
        benchmark: cuDNN's autotuner (Lightning's ``benchmark``).
        limit_train_batches: train on at most this many batches (an int) or this fraction of them
            (a float in (0, 1]) per local epoch.
        gradient_clip_val: clip each client's gradients before every SGD step: their total norm to
            this value (``norm``) or each element to ``[-value, value]`` (``value``). Unset: no clipping.
        gradient_clip_algorithm: ``norm`` (default) or ``value``.
        accumulate_grad_batches: one SGD step every this many batches, on the mean of their
            gradients (each loss divided by this number); an epoch's last step takes what is left.
    """

    accelerator: str = "auto"
    precision: str | int | None = None
    deterministic: bool | None = None
    benchmark: bool | None = None
    limit_train_batches: int | float | None = None
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: Literal["norm", "value"] | None = None
    accumulate_grad_batches: int = 1

    def __post_init__(self) -> None:
        if self.precision is not None and str(self.precision) not in PRECISIONS:
            raise ValueError(
                f"trainer.precision {self.precision!r} is not a Lightning precision; use one of {list(PRECISIONS)}"
            )
        if self.gradient_clip_val is not None and not (
            math.isfinite(self.gradient_clip_val) and self.gradient_clip_val > 0
        ):
            raise ValueError(
                f"trainer.gradient_clip_val must be a positive number, got {self.gradient_clip_val}; "
                "leave it unset for no clipping"
            )
        if self.gradient_clip_algorithm not in (None, "norm", "value"):
            raise ValueError(
                f"trainer.gradient_clip_algorithm must be 'norm' or 'value', got {self.gradient_clip_algorithm!r}"
            )
        if isinstance(self.accumulate_grad_batches, bool) or self.accumulate_grad_batches < 1:
            raise ValueError(
                f"trainer.accumulate_grad_batches must be a positive number of batches, got "
                f"{self.accumulate_grad_batches}"
            )
        limit = self.limit_train_batches
        if limit is not None and (
            isinstance(limit, bool)
            or (isinstance(limit, int) and limit < 1)
            or (isinstance(limit, float) and not 0 < limit <= 1)
        ):
            raise ValueError(
                f"trainer.limit_train_batches must be a positive number of batches or a fraction in (0, 1], got {limit}"
            )

    def changed(self) -> dict[str, Any]:
        """The settings that differ from their defaults: what a local fit is told."""
        defaults = TrainerSettings()
        return {k: v for k, v in asdict(self).items() if getattr(defaults, k) != v}


TRAINER_KEYS = tuple(f.name for f in fields(TrainerSettings))


@dataclass(frozen=True)
class StepRules:
    """What a client's manual SGD step does besides the step: clipping and accumulation."""

    clip_val: float | None = None
    clip_algorithm: str = "norm"
    accumulate: int = 1

    @classmethod
    def from_trainer(cls, trainer: dict[str, Any]) -> StepRules:
        return cls(
            clip_val=trainer.get("gradient_clip_val"),
            clip_algorithm=trainer.get("gradient_clip_algorithm") or "norm",
            accumulate=int(trainer.get("accumulate_grad_batches", 1)),
        )

    def steps_after(self, position: int, epoch_batches: int) -> bool:
        """Whether the batch at ``position`` (0-based) of an epoch of ``epoch_batches`` ends an SGD step."""
        return (position + 1) % self.accumulate == 0 or position + 1 == epoch_batches


def lightning_kwargs(trainer: dict[str, Any]) -> dict[str, Any]:
    """The settings a sequential fit passes to ``lightning.Trainer`` (the step's own are left out)."""
    return {k: v for k, v in trainer.items() if k not in STEP_KEYS}


# What the batched executor honours besides the step rules: the device and these precisions.
BATCHED_PRECISIONS = (*FULL_PRECISION, "bf16-mixed", "bf16")


def batched_refusals(trainer: dict[str, Any]) -> list[str]:
    """The settings the batched executor does not honour, each as ``key=value``."""
    refused = []
    for key, value in sorted(trainer.items()):
        if key in STEP_KEYS or key == "accelerator":
            continue
        if key == "precision" and value in BATCHED_PRECISIONS:
            continue
        if key in ("deterministic", "benchmark") and not value:
            continue
        refused.append(f"trainer.{key}={value}")
    return refused


def check_batched(trainer: dict[str, Any]) -> None:
    """Refuse, naming them, the settings the batched executor would otherwise ignore."""
    refused = batched_refusals(trainer)
    if refused:
        raise ValueError(
            f"the batched executor does not honour {', '.join(refused)}; use --federation.executor sequential, "
            "which does, or leave the setting out"
        )
