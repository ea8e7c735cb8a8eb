"""Data that drifts over rounds: a schedule of changes to the clients' shards.

``data.drift`` lists changes, each from a stated round on; the rounds split the run into *phases*
(phase 0 before the first change). A change is one of:

- ``rotate``: class sets move between clients: from the round on, client ``i`` holds what client
  ``(i + step) mod N`` held before (training and test data alike).
- ``arrive``: new classes arrive: the listed classes are held back from every client until the
  round, then each client that the partition gave them to receives its samples of them.
- ``shift``: a covariate shift: from the round on, every image is rotated by ``rotation`` degrees,
  gets Gaussian noise of standard deviation ``noise`` (on the [0, 1] pixel scale; drawn once per
  image from the run's seed, so a client sees the same noisy image every epoch) and/or is inverted.
  Shifts add up: a second ``shift`` applies on top of the first.

The partition itself is drawn once, as without drift, so a client's data in every phase is a pure
function of the run's seed, the schedule and the round: a resumed run sees what an uninterrupted one
would, and the partition's fingerprint covers the schedule.

    data:
      drift:
        - {round: 6, kind: rotate}
        - {round: 11, kind: shift, rotation: 30, noise: 0.1}
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch

DriftKind = Literal["rotate", "arrive", "shift"]
KINDS = ("rotate", "arrive", "shift")
DRIFT_STREAM = 2  # SeedSequence key: the shift's noise, apart from the partition's stream (1)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Drift:
    """One change of the clients' data, from round ``round`` on (see the module docstring).

    Args:
        round: the first round with the changed data (2 or later).
        kind: ``rotate``, ``arrive`` or ``shift``.
        step: ``rotate``: client ``i`` takes the data of client ``i + step`` (mod N).
        classes: ``arrive``: the classes held back until ``round``.
        rotation: ``shift``: degrees, counter-clockwise.
        noise: ``shift``: standard deviation of the added Gaussian noise, pixel scale [0, 1].
        invert: ``shift``: invert the images (255 - value).
    """

    round: int
    kind: DriftKind
    step: int = 1
    classes: list[int] = field(default_factory=list)
    rotation: float = 0.0
    noise: float = 0.0
    invert: bool = False

    @classmethod
    def of(cls, entry: Drift | Mapping[str, Any]) -> Drift:
        """A change from a config entry (a mapping of this class's fields), or the change itself."""
        if isinstance(entry, Drift):
            return entry
        if not isinstance(entry, Mapping):
            raise ValueError(f"data.drift entry {entry!r} is not a mapping; write e.g. {{round: 6, kind: rotate}}")
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(entry) - set(names))
        if unknown:
            raise ValueError(f"data.drift entry {dict(entry)}: unknown key(s) {unknown}; the keys are {names}")
        missing = [name for name in ("round", "kind") if name not in entry]
        if missing:
            raise ValueError(
                f"data.drift entry {dict(entry)}: {' and '.join(missing)} missing, e.g. {{round: 6, kind: rotate}}"
            )
        return cls(**entry)

    def __post_init__(self) -> None:
        # one form for every way of writing the same change (the fingerprint hashes it)
        if isinstance(self.classes, tuple):
            object.__setattr__(self, "classes", list(self.classes))
        for name in ("rotation", "noise"):  # YAML reads 30 as an int
            if _is_int(getattr(self, name)):
                object.__setattr__(self, name, float(getattr(self, name)))
        where = f"data.drift entry {asdict(self)}"
        if self.kind not in KINDS:
            raise ValueError(f"{where}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if not isinstance(self.classes, list) or not all(_is_int(k) for k in self.classes):
            raise ValueError(f"{where}: classes must be a list of class indices, e.g. classes: [8, 9]")
        if not (isinstance(self.rotation, float) and isinstance(self.noise, float)):  # ints were made floats above
            raise ValueError(f"{where}: rotation and noise must be numbers")
        if not isinstance(self.invert, bool):
            raise ValueError(f"{where}: invert must be true or false")
        if not _is_int(self.round) or self.round < 2:
            raise ValueError(f"{where}: round must be an integer of at least 2 (round 1 trains on the partition)")
        if not _is_int(self.step):
            raise ValueError(f"{where}: step must be an integer")
        if self.kind == "arrive" and not self.classes:
            raise ValueError(f"{where}: an arrive change needs the classes that arrive, e.g. classes: [8, 9]")
        if self.kind != "arrive" and self.classes:
            raise ValueError(f"{where}: classes belong to an arrive change only")
        if self.kind == "shift":
            if not math.isfinite(self.rotation) or not (math.isfinite(self.noise) and self.noise >= 0):
                raise ValueError(f"{where}: rotation must be finite and noise a finite number >= 0")
            if self.rotation == 0 and self.noise == 0 and not self.invert:
                raise ValueError(f"{where}: a shift changes nothing; give rotation, noise or invert: true")
        elif self.rotation or self.noise or self.invert:
            raise ValueError(f"{where}: rotation, noise and invert belong to a shift change only")


class Schedule:
    """The phases of a drift schedule: which data each client holds in each phase.

    Args:
        changes: the schedule (any order; changes of one round apply in the order given).
        num_clients: N.
    """

    def __init__(self, changes: Sequence[Drift], num_clients: int) -> None:
        self.changes = sorted(changes, key=lambda change: change.round)  # stable: same-round order kept
        self.num_clients = num_clients
        for change in self.changes:
            if change.kind == "rotate" and change.step % num_clients == 0:
                raise ValueError(
                    f"data.drift at round {change.round}: rotate with step={change.step} hands every one of the "
                    f"{num_clients} clients its own data back; use a step that is not a multiple of {num_clients}"
                )
        self.starts = [1, *sorted({change.round for change in self.changes})]  # each phase's first round

    def check_classes(self, num_classes: int) -> None:
        """Refuse classes that the dataset does not have."""
        for change in self.changes:
            bad = [c for c in change.classes if isinstance(c, bool) or not 0 <= c < num_classes]
            if bad:
                raise ValueError(
                    f"data.drift at round {change.round}: classes {bad} are not classes of the dataset "
                    f"(0 .. {num_classes - 1})"
                )

    def __len__(self) -> int:
        return len(self.starts)

    def phase(self, round_: int) -> int:
        """The phase of round ``round_`` (0 before the first change)."""
        return sum(1 for start in self.starts[1:] if start <= round_)

    def applied(self, phase: int) -> list[Drift]:
        """The changes in effect in ``phase``."""
        return [change for change in self.changes if change.round <= self.starts[phase]]

    def source(self, phase: int, cid: int) -> int:
        """Whose shard of the partition client ``cid`` holds in ``phase``."""
        return (cid + sum(c.step for c in self.applied(phase) if c.kind == "rotate")) % self.num_clients

    def held_back(self, phase: int) -> set[int]:
        """Classes no client holds yet in ``phase``."""
        return {k for c in self.changes if c.kind == "arrive" and c.round > self.starts[phase] for k in c.classes}

    def shifts(self, phase: int) -> list[tuple[int, Drift]]:
        """The shifts in effect in ``phase``, each with its index in the schedule (its noise stream)."""
        return [(i, c) for i, c in enumerate(self.changes) if c.kind == "shift" and c.round <= self.starts[phase]]

    def check_rounds(self, rounds: int) -> None:
        late = [c.round for c in self.changes if c.round > rounds]
        if late:
            raise ValueError(
                f"data.drift has changes at rounds {late}, after the run's last round (federation.rounds={rounds}); "
                "move them earlier or run more rounds"
            )


def keep(labels: np.ndarray, indices: np.ndarray, held_back: set[int]) -> np.ndarray:
    """The samples of ``indices`` whose class is not held back."""
    if not held_back:
        return indices
    return indices[~np.isin(labels[indices], sorted(held_back))]


def shift_images(
    images: torch.Tensor, shifts: list[tuple[int, Drift]], seed: int, cid: int, split: int
) -> torch.Tensor:
    """``images`` (uint8, N x C x H x W) after the shifts in order; the noise of shift ``i`` for client
    ``cid``'s ``split`` (0 train, 1 test) is drawn from its own stream of the run's seed."""
    out = images
    for index, change in shifts:
        if change.rotation:
            from torchvision.transforms.v2 import functional as tvf

            out = tvf.rotate(out, change.rotation)
        if change.noise:
            rng = np.random.default_rng(np.random.SeedSequence([seed, DRIFT_STREAM, index, cid, split]))
            noise = torch.from_numpy(rng.normal(0.0, change.noise * 255.0, size=tuple(out.shape)).astype(np.float32))
            out = (out.float() + noise).round().clamp(0, 255).to(torch.uint8)
        if change.invert:
            out = 255 - out
    return out
