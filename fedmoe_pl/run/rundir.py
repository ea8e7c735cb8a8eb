"""The run directory: everything needed to understand a run and to resume it.

Every file is written whole or not at all (a temporary file, fsync, rename), and a failed write
removes its temporary file, so a full disk or a kill leaves the previous complete state behind.
One process at a time owns a run directory (a lock file, released by the OS if the process dies).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from filelock import FileLock, Timeout

from fedmoe_pl.errors import RunError

log = logging.getLogger(__name__)

# The run directory's files: this module writes and reads them; other modules use its names and readers.
CONFIG = "config.yaml"  # the resolved config
PARTITION = "partition.json"  # who holds which classes
METRICS = "metrics.jsonl"  # one line per evaluated round
SUMMARY = "summary.json"  # how the run ended, written however it ends
CELL = "cell.json"  # a grid cell's axes and seed (runs started by ``fedmoe-pl grid``)
CHECKPOINT = "last.ckpt"
PREVIOUS_CHECKPOINT = "previous.ckpt"  # the one before: what a resume falls back to if the last one's files are lost
CHECKPOINT_KEYS = ("format", "round", "schedule", "clients", "server", "meta")
CHECKPOINT_FORMAT = 3  # 3: clients' initial weights drawn from (seed, id); earlier ones cannot be resumed

# A round's record (a line of METRICS) holds the round and its scalars at the top level (numbers, flags,
# lists of client ids, the final round's confusion matrix) and each other kind of value in its own section:
PER_CLIENT = "per_client"  # {name: {client: number}}
PER_CLIENT_CLASS = "per_client_class"  # {name: {client: {class: number}}}
HISTOGRAMS = "histograms"  # {name: {client: [counts of equal bins over [0, 1]]}}
SECTIONS = (PER_CLIENT, PER_CLIENT_CLASS, HISTOGRAMS)


def _write_failed(path: Path, err: OSError) -> RunError:
    return RunError(
        f"could not write {str(path)!r}: {err.strerror or err}. The run directory keeps its last complete "
        f"checkpoint: free space or fix permissions, then continue with --resume {path.parent}"
    )


def _atomic_write_bytes(path: Path, write: Callable[[IO[bytes]], Any], previous: Path | None = None) -> None:
    """Write through a temporary file and rename, so a crash never leaves a half-written file.
    ``previous``: where the file being replaced is kept (renamed, so one of the two always exists)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _write_failed(path, err) from err
        raise


def fsync_directory(directory: Path) -> None:
    """Make the renames inside ``directory`` durable (where the platform lets a folder be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform that cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def make_folder(path: str | Path, what: str, create: bool = True) -> Path:
    """Create the folder ``path`` (``what`` names its option, e.g. ``--output``) or refuse in one line;
    ``create=False`` only checks that nothing on the way is a file."""
    path = Path(path)
    for part in (path, *path.parents):
        if part.exists() and not part.is_dir():
            raise ValueError(f"{what} {str(path)!r}: {str(part)!r} is a file, not a folder; choose another {what}")
    if not create:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(
            f"{what} {str(path)!r} cannot be created: {err.strerror or err}; choose another {what}"
        ) from err
    return path


def finite_or_none(value: Any) -> Any:
    """``value`` with NaN and infinities replaced by ``None``, so that it is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value


def to_json(obj: Any, indent: int | None = None) -> str:
    return json.dumps(finite_or_none(obj), indent=indent, allow_nan=False)


def sectioned(record: dict[str, Any]) -> dict[str, Any]:
    """A round's record in the current layout. Records written before the sections existed kept every
    value at the top level (``client_acc``, ``client_class_acc``, ``gate_global_hist``, ...): their
    per-client mappings are moved into the sections by shape (a histogram: a list per client; per
    client and class: a mapping per client; per client: a number per client; a histogram is named by
    its quantity, ``gate_global_hist`` becoming ``gate_global``), here and nowhere else."""
    if any(key in record for key in SECTIONS):
        return record
    out: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {key: {} for key in SECTIONS}
    for key, value in record.items():
        if not isinstance(value, dict) or not value:
            out[key] = value
        elif all(isinstance(v, list) for v in value.values()):
            sections[HISTOGRAMS][key.removesuffix("_hist")] = value
        elif all(isinstance(v, dict) for v in value.values()):
            sections[PER_CLIENT_CLASS][key] = value
        else:
            sections[PER_CLIENT][key] = value
    return {**out, **{key: section for key, section in sections.items() if section}}


class RunDirectory:
    """Files of one run: config, partition, per-round metrics, summary and the last checkpoint."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock: FileLock | None = None

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    def holds_run(self) -> bool:
        """Whether a run has saved state here (its round-0 checkpoint is written before any metrics) or, as
        a Flower run, which keeps no checkpoint, its metrics."""
        return (
            self.checkpoint_path.exists()
            or (self.path / PREVIOUS_CHECKPOINT).exists()
            or (self.path / METRICS).exists()
        )

    def acquire(self) -> None:
        """Create the directory and take it for this process; refuse if another process has it."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock = FileLock(self.path / ".lock", timeout=0)
            lock.acquire()
        except Timeout:
            raise RunError(
                f"run directory {str(self.path)!r} is in use by another running process; wait for it to "
                "end or choose another --federation.run_dir"
            ) from None
        except OSError as err:  # refused before any training: a configuration error
            raise ValueError(
                f"run directory {str(self.path)!r} cannot be written: {err.strerror or err}; fix its "
                "permissions or choose another --federation.run_dir"
            ) from err
        self._lock = lock

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def write_text(self, name: str, text: str) -> None:
        _atomic_write_bytes(self.path / name, lambda fh: fh.write(text.encode()))

    def write_json(self, name: str, obj: Any) -> None:
        self.write_text(name, to_json(obj, indent=2) + "\n")

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one strict-JSON line; a failed append is cut back so no partial line remains."""
        path = self.path / METRICS
        line = (to_json(record) + "\n").encode()
        with open(path, "ab") as fh:
            size = fh.tell()
            try:
                fh.write(line)
                fh.flush()
                os.fsync(fh.fileno())
            except OSError as err:
                fh.truncate(size)
                raise _write_failed(path, err) from err

    def read_metrics(self) -> list[dict[str, Any]]:
        """The evaluated rounds' records, in order ([] before the first), in the current layout
        (:func:`sectioned`: run directories of earlier versions read the same)."""
        path = self.path / METRICS
        if not path.exists():
            return []
        return [sectioned(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]

    def read_json(self, name: str) -> Any:
        """A JSON file of the run (``SUMMARY``, ``PARTITION``, ``CELL``), or None when it is absent or unreadable."""
        try:
            return json.loads((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def read_summary(self) -> dict[str, Any] | None:
        return self.read_json(SUMMARY)  # type: ignore[no-any-return]

    def read_config(self) -> dict[str, Any]:
        """The run's resolved config."""
        import yaml

        return yaml.safe_load((self.path / CONFIG).read_text())  # type: ignore[no-any-return]

    @property
    def status(self) -> str | None:
        """How the run ended (``completed``, ``interrupted``, ``stopped``, ``failed``); None while it has
        no summary (running, or killed before it could write one)."""
        summary = self.read_summary()
        return None if summary is None else summary.get("status")

    def truncate_metrics(self, last_round: int) -> None:
        """Drop lines of rounds after ``last_round`` (written after the last checkpoint)."""
        kept = [r for r in self.read_metrics() if r["round"] <= last_round]
        self.write_text(METRICS, "".join(to_json(r) + "\n" for r in kept))

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        import torch  # here, not at the top: the command line's parsers read this module's names

        _atomic_write_bytes(self.checkpoint_path, lambda fh: torch.save(state, fh), self.path / PREVIOUS_CHECKPOINT)

    @staticmethod
    def locate(path: str | Path) -> Path:
        """The run directory of a ``--resume`` argument: the directory itself, or a checkpoint's folder."""
        path = Path(path)
        return path.parent if path.is_file() else path

    @staticmethod
    def load_checkpoint(path: str | Path) -> dict[str, Any]:
        """Load a checkpoint from a run directory or a checkpoint file."""
        path = Path(path)
        file = path / CHECKPOINT if path.is_dir() else path
        if path.is_dir() and not file.exists() and (path / PREVIOUS_CHECKPOINT).exists():
            file = path / PREVIOUS_CHECKPOINT  # killed between the two renames of a checkpoint write
        if not file.exists():
            raise FileNotFoundError(
                f"no checkpoint at {str(file)!r}; --resume takes a run directory holding "
                f"{CHECKPOINT} or the path of a checkpoint file"
            )
        try:
            import torch

            state = torch.load(file, map_location="cpu", weights_only=False)
            missing = [key for key in CHECKPOINT_KEYS if key not in state]
        except Exception as err:
            previous = path / PREVIOUS_CHECKPOINT
            if path.is_dir() and file != previous and previous.exists():  # a crash damaged the last one
                log.warning("%s cannot be read (%s); resuming from %s", file, type(err).__name__, previous.name)
                return RunDirectory.load_checkpoint(previous)
            raise ValueError(
                f"checkpoint {str(file)!r} cannot be read ({type(err).__name__}: {err}); it is damaged. "
                "Start a new run (another --federation.run_dir)"
            ) from err
        if missing and "meta" in state:
            raise ValueError(
                f"checkpoint {str(file)!r} was written by an earlier fedmoe-pl (it lacks {missing}); "
                "finish that run with the version that started it, or start a new run"
            )
        if missing:
            raise ValueError(
                f"{str(file)!r} is not a fedmoe-pl checkpoint (it lacks {missing}); --resume takes the "
                "run directory of a fedmoe-pl fit"
            )
        if state["format"] < CHECKPOINT_FORMAT:
            raise ValueError(
                f"checkpoint {str(file)!r} was written by an earlier fedmoe-pl (format {state['format']}), whose "
                f"clients drew their initial weights from one shared random stream; this version (format "
                f"{CHECKPOINT_FORMAT}) would rebuild them differently. Finish that run with the version that "
                "started it, or start a new run"
            )
        return state  # type: ignore[no-any-return]
