"""A grid of experiments from one small YAML: axes of config overlays, times seeds.

A grid file names a base config, the axes (each value one or more overlays, or settings), the
seeds, extra arguments for every run, and where the runs go::

    name: paper
    base: [../paper/base.yaml]
    axes:
      dataset: {cifar10: ../paper/cifar10.yaml, cifar100: ../paper/cifar100.yaml}
      method: ../methods/*.yaml          # a glob: one value per file, named after it
    seeds: [0, 1, 2]
    args: [--federation.rounds, "500"]
    output: runs/paper
    slurm: {partition: gpu, time: "1-00:00:00", gpus: 1, throttle: 16}

A value may instead be settings of ``fedmoe-pl fit`` (``norm: {layer: {algorithm.init_args.gate_norm:
layer}}``), passed as ``--key=value`` after the grid's ``args``, or a list of both
(``fedavg: [../methods/fedavg.yaml, {client.zoo: [mlp1]}]``). Overlay paths are relative to the
grid file; ``output`` is relative to the working directory.
Every combination of one value per axis and one seed is a cell, run as ``fedmoe-pl fit`` with the
base and the cell's overlays in order, into ``output/<value>-<value>-...-seed<k>``.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

import yaml

from fedmoe_pl.run.rundir import CELL, RunDirectory

_VALUE = re.compile(r"^[A-Za-z0-9_.]+$")


@dataclass(frozen=True)
class Cell:
    """One run of a grid: its axis values, seed, overlays and run directory."""

    name: str
    axes: dict[str, str]
    seed: int
    configs: list[str]
    args: list[str]
    run_dir: str

    def fit_args(self, resume: bool = True) -> list[str]:
        """The ``fedmoe-pl fit`` arguments of this cell (with ``--resume`` if it has started and ``resume``)."""
        argv = [arg for config in self.configs for arg in ("--config", config)]
        argv += [f"--seed_everything={self.seed}", f"--federation.run_dir={self.run_dir}", f"--wandb.name={self.name}"]
        argv += [*self.args]
        if resume and (Path(self.run_dir) / "last.ckpt").exists():
            argv += ["--resume", self.run_dir]
        return argv

    def status(self) -> str:
        """``finished``, ``started`` (a checkpoint to resume from) or ``new``."""
        run = RunDirectory(self.run_dir)
        if run.status == "completed":
            return "finished"
        return "started" if run.checkpoint_path.exists() else "new"


@dataclass
class SlurmOptions:
    """How the Slurm launcher asks for resources; every field may also be given as a flag.

    Args:
        partition: partition (``-p``); the cluster's default when unset.
        time: time limit per task, in any form sbatch takes (``1-00:00:00``, ``90``).
        gpus: GPUs per task (``--gres=gpu:N``); 0 for CPU jobs.
        cpus_per_task: CPU cores per task (data loading and the evaluation run on the host).
        mem: memory per task (``--mem``), e.g. ``16G``.
        account: account to charge (``-A``).
        throttle: at most this many tasks of the array run at once (``%N``); 0 for no limit.
        signal_lead_s: seconds before the time limit at which Slurm sends SIGUSR1; the run then
            keeps its last checkpoint and requeues itself. Slurm may send it up to a minute early.
        extra: further ``#SBATCH`` options, e.g. ``["--qos=long", "--constraint=a100"]``.
    """

    partition: str | None = None
    time: str | None = None
    gpus: int = 0
    cpus_per_task: int = 1
    mem: str | None = None
    account: str | None = None
    throttle: int = 0
    signal_lead_s: int = 120
    extra: list[str] = field(default_factory=list)


def option_help(cls: type) -> dict[str, str]:
    """Each field's description from a class docstring's ``Args:`` section (continuation lines joined)."""
    out: dict[str, str] = {}
    name, in_args = None, False
    for line in (cls.__doc__ or "").splitlines():
        text, indent = line.strip(), len(line) - len(line.lstrip())
        found = re.match(r"^(\w+): (.*)$", text)
        if text == "Args:":
            in_args = True
        elif in_args and found and indent == 8:  # "name: text" at the arguments' indentation
            name = found.group(1)
            out[name] = found.group(2)
        elif in_args and name and text:
            out[name] += " " + text
    return out


@dataclass
class Grid:
    """A parsed grid file; :meth:`cells` expands it."""

    name: str
    base: list[str]
    axes: dict[str, dict[str, list[str]]]
    seeds: list[int]
    args: list[str]
    output: str
    slurm: SlurmOptions
    source: str = ""

    @classmethod
    def load(cls, path: str | Path) -> Grid:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as err:
            raise FileNotFoundError(f"cannot read the grid file {str(path)!r}: {err.strerror}") from err
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            where = getattr(err, "problem_mark", None)
            line = f" (line {where.line + 1})" if where is not None else ""
            raise ValueError(
                f"grid file {str(path)!r} is not valid YAML{line}; fix it or give another grid file"
            ) from None
        if not isinstance(raw, dict):
            raise ValueError(f"grid file {str(path)!r} must be a mapping with at least 'base' and 'axes'")
        known = {"name", "base", "axes", "seeds", "args", "output", "slurm"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"grid file {str(path)!r}: unknown keys {unknown}; the keys are {sorted(known)}")
        here = path.parent
        name = str(raw.get("name", path.stem))
        base = [_config_path(here, p, path) for p in _as_list(raw.get("base", []))]
        axes = {str(axis): _axis_values(here, axis, spec, path) for axis, spec in (raw.get("axes") or {}).items()}
        seeds = [int(s) for s in _as_list(raw.get("seeds", [0]))]
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError(f"grid file {str(path)!r}: seeds {seeds} must be a non-empty list without repeats")
        slurm_raw = raw.get("slurm") or {}
        try:
            slurm = SlurmOptions(**slurm_raw)
        except TypeError as err:
            raise ValueError(f"grid file {str(path)!r}: slurm section: {err}") from err
        args = [str(a) for a in _as_list(raw.get("args", []))]
        output = str(raw.get("output", f"runs/grids/{name}"))
        return cls(name, base, axes, seeds, args, output, slurm, source=str(path))

    def cells(self) -> list[Cell]:
        """Every combination of one value per axis and one seed, in a stable order. A value's overlays
        follow the base's; its settings (``--key=value``) follow the grid's ``args``."""
        names = list(self.axes)
        out = []
        for values in product(*(self.axes[a].items() for a in names)):
            items = [item for _, entries in values for item in entries]
            settings = [item for item in items if item.startswith("--")]
            configs = [*self.base, *(item for item in items if not item.startswith("--"))]
            for seed in self.seeds:
                label = "-".join([*(v for v, _ in values), f"seed{seed}"])
                axes = {a: v for a, (v, _) in zip(names, values)}
                out.append(Cell(label, axes, seed, configs, [*self.args, *settings], str(Path(self.output) / label)))
        return out


def select(cells: list[Cell], only: list[str]) -> list[Cell]:
    """The cells matching every ``AXIS=VALUE[,VALUE...]`` of ``only`` (``seed`` is an axis too)."""
    wanted: dict[str, set[str]] = {}
    for entry in only:
        axis, sep, given = entry.partition("=")
        if not sep or not axis or not given:
            raise ValueError(f"--only {entry!r}: give AXIS=VALUE (or AXIS=V1,V2), e.g. --only norm=switch seed=0")
        wanted.setdefault(axis, set()).update(v for v in given.split(",") if v)
    for axis, values in wanted.items():
        known = {str(c.seed) if axis == "seed" else c.axes.get(axis, "") for c in cells} - {""}
        if not known:
            axes = sorted({a for c in cells for a in c.axes} | {"seed"})
            raise ValueError(f"--only: the grid has no axis {axis!r}; its axes are {axes}")
        if values - known:
            raise ValueError(
                f"--only: axis {axis!r} has no value {sorted(values - known)}; its values are {sorted(known)}"
            )

    def keep(cell: Cell) -> bool:
        return all((str(cell.seed) if a == "seed" else cell.axes.get(a)) in v for a, v in wanted.items())

    return [cell for cell in cells if keep(cell)]


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _config_path(here: Path, value: Any, grid: Path) -> str:
    path = Path(os.path.normpath(here / str(value)))
    if not path.is_file():
        raise FileNotFoundError(f"grid file {str(grid)!r} names {value!r}, but {str(path)!r} is no file")
    return str(path)


def _axis_values(here: Path, axis: str, spec: Any, grid: Path) -> dict[str, list[str]]:
    """An axis as ``{value: [overlay, ...]}``, from a mapping or a glob of overlay files."""
    if isinstance(spec, str):
        files = sorted(Path(os.path.normpath(f)) for f in here.glob(spec))
        if not files:
            raise FileNotFoundError(f"grid file {str(grid)!r}: axis {axis!r} glob {spec!r} matches no file")
        values = {f.stem: [str(f)] for f in files}
    elif isinstance(spec, dict) and spec:
        values = {
            str(v): [
                item
                for part in _as_list(entry)
                for item in (
                    _settings(axis, str(v), part, grid) if isinstance(part, dict) else [_config_path(here, part, grid)]
                )
            ]
            for v, entry in spec.items()
        }
    else:
        raise ValueError(
            f"grid file {str(grid)!r}: axis {axis!r} must map values to overlay files, settings or a list of both, "
            "or be a glob, "
            f"got {spec!r}"
        )
    for value in values:
        if not _VALUE.match(value):
            raise ValueError(
                f"grid file {str(grid)!r}: axis {axis!r} value {value!r} may hold only letters, digits, '_' and '.'"
                " (it becomes part of a directory name)"
            )
    return values


def _settings(axis: str, value: str, entry: dict[Any, Any], grid: Path) -> list[str]:
    """An axis value given as settings (``{algorithm.init_args.gate_norm: layer}``), as ``--key=value``."""
    out = []
    for key, setting in entry.items():
        if not isinstance(key, str) or not _VALUE.match(key):
            raise ValueError(
                f"grid file {str(grid)!r}: axis {axis!r} value {value!r} sets {key!r}; a setting is a dotted key "
                "of fedmoe-pl fit, e.g. algorithm.init_args.gate_norm"
            )
        out.append(f"--{key}={setting if isinstance(setting, str) else json.dumps(setting)}")
    return out


# Keys of a cell's resolved config that name the cell rather than change its results.
_CELL_KEYS = ("federation.run_dir", "wandb.name", "config", "__path__")


def deduplicate(cells: list[Cell]) -> tuple[list[Cell], list[tuple[Cell, Cell]]]:
    """The cells without those that resolve to the same run config as a later cell, and the pairs
    ``(left out, kept)``. The later cell wins, as a later overlay does (FedAvg's overlay sets the
    homogeneous zoo, so its cells on a heterogeneous-zoo axis value run the homogeneous setting)."""
    from jsonargparse import ArgumentError

    from fedmoe_pl.cli import _experiment_parser, one_line

    parser = _experiment_parser("a grid cell")
    resolved = []
    for cell in cells:
        try:
            cfg = parser.parse_args(cell.fit_args(resume=False))
        except ArgumentError as err:
            raise ValueError(f"grid cell {cell.name}: {one_line(str(err))}") from None
        flat = cfg.clone()
        for key in _CELL_KEYS:
            if key in flat:
                del flat[key]
        resolved.append(json.dumps(flat.as_dict(), sort_keys=True, default=str))
    last = {config: i for i, config in enumerate(resolved)}
    kept = [cell for i, cell in enumerate(cells) if last[resolved[i]] == i]
    left_out = [(cell, cells[last[resolved[i]]]) for i, cell in enumerate(cells) if last[resolved[i]] != i]
    return kept, left_out


def write_cell_file(cell: Cell) -> None:
    """Record the cell's axes in its run directory (read by ``fedmoe-pl report``)."""
    run_dir = Path(cell.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CELL).write_text(json.dumps(asdict(cell), indent=2) + "\n")


def describe(cells: list[Cell]) -> str:
    lines = [f"{len(cells)} cells"]
    for i, cell in enumerate(cells):
        lines.append(f"[{i}] {cell.name} ({cell.status()}): fedmoe-pl fit {shlex.join(cell.fit_args())}")
    return "\n".join(lines)


def run_local(cells: list[Cell]) -> int:
    """Run the unfinished cells one after another, each in its own process; return the exit code.

    A failing cell is reported and the next one runs; a stop signal (exit 128 + N of a cell)
    ends the grid, since its run directory keeps the last checkpoint and the same command resumes.
    """
    failed: list[str] = []
    for i, cell in enumerate(cells):
        if cell.status() == "finished":
            print(f"[{i + 1}/{len(cells)}] {cell.name}: finished, skipped", flush=True)
            continue
        print(f"[{i + 1}/{len(cells)}] {cell.name}", flush=True)
        write_cell_file(cell)
        code = subprocess.run([sys.executable, "-m", "fedmoe_pl.cli", "fit", *cell.fit_args()]).returncode
        if code > 128 or code < 0:
            print(f"grid stopped by a signal in cell {cell.name}; run the same command to resume", file=sys.stderr)
            return code if code > 128 else 128 - code
        if code != 0:
            failed.append(cell.name)
    if failed:
        print(f"{len(failed)} of {len(cells)} cells failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
