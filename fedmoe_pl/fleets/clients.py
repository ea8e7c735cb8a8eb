"""Where a run's clients live between rounds: all in memory, or on disk until sampled.

A pool hands the loop client ``cid`` as a LightningModule. The loop takes the round's clients
with ``pool[cid]`` (they stay live until :meth:`release` at the end of the round), reads others
with :meth:`visit` (evaluation: loaded, used, dropped), and saves the pool with every checkpoint.

:class:`DiskClients` keeps only the live clients in memory. Each client's state is a file per
version (``<cid>.r<round>.pt``, written when a round changed it); the checkpoint records which
version of each client is current, so a run killed half-way through writing a round resumes from
the versions its checkpoint names. A client that was never written is built afresh when used: its
initial weights are a pure function of the run's seed and its id, so it costs nothing until then.

Client files survive a crash or a power loss: each is fsynced when written and its folder before
the checkpoint that names it, and the versions the previous checkpoint names stay on disk until
the next checkpoint is safely written, so the previous checkpoint (``previous.ckpt``) can always
be resumed from. Temporary files a killed process left behind are removed when a store opens.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from fedmoe_pl.algorithms import FederatedClient
from fedmoe_pl.errors import RunError
from fedmoe_pl.run.rundir import fsync_directory
from fedmoe_pl.run.signals import uncut

Builder = Callable[[int], FederatedClient]


class ClientPool(Protocol):
    def populate(self, build: Builder, num_clients: int) -> None:
        """Clients ``0 .. num_clients - 1``, each built by ``build(cid)`` when first used."""

    def __len__(self) -> int: ...

    def __getitem__(self, cid: int) -> FederatedClient:
        """Client ``cid``, live (and saved when released) until :meth:`release`."""
        ...

    def visit(self, ids: Iterable[int]) -> Iterator[FederatedClient]:
        """The listed clients one at a time, for reading only (evaluation)."""
        ...

    def release(self, round_: int) -> None:
        """End of a round: the live clients are saved (as of ``round_``) and may leave memory."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...

    def checkpoint_saved(self) -> None:
        """The checkpoint holding the last :meth:`state_dict` is safely written."""


class ClientFiles:
    """Client states as files, one per version (``<cid>.r<round>.pt``), and each client's current version.

    A version is written when a round changed the client. The checkpoint records the version map
    (:meth:`snapshot`); once it is safely written (:meth:`committed`), files that neither it nor the
    checkpoint before it names are deleted, so at most three versions of a client exist: the ones
    the last two checkpoints name and a newer one.

    Args:
        directory: where files are written; None: read only.
        fallback: where to read a version ``directory`` lacks (the store of the rank that writes
            the checkpoints, for the other ranks of a multi-process run).
    """

    def __init__(self, directory: Path | None, fallback: Path | None = None) -> None:
        self.directory, self.fallback = directory, fallback
        self.version: dict[int, int] = {}  # cid -> round of its current file; absent: initial weights
        self.saved: dict[int, int] = {}  # the versions the last written checkpoint names
        self.saved_before: dict[int, int] = {}  # the versions the checkpoint before it names
        self._pending: dict[int, int] = {}  # the versions of the checkpoint being written
        self._on_disk: dict[int, set[int]] = {}  # versions of each client known to be on disk
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            for stale in directory.glob(".*.tmp"):  # left by a process killed while writing
                stale.unlink(missing_ok=True)

    def path(self, cid: int, version: int) -> Path:
        for folder in (self.directory, self.fallback):
            if folder is not None and (folder / f"{cid}.r{version}.pt").exists():
                return folder / f"{cid}.r{version}.pt"
        return (self.directory or self.fallback or Path()) / f"{cid}.r{version}.pt"

    def read(self, cid: int) -> dict[str, torch.Tensor] | None:
        """The client's current state, or None while it has its initial weights."""
        if cid not in self.version:
            return None
        path = self.path(cid, self.version[cid])
        try:
            return torch.load(path, map_location="cpu")  # type: ignore[no-any-return]
        except Exception as err:
            raise RunError(
                f"client file {str(path)!r} is damaged ({damage(path) or f'{type(err).__name__}: {err}'}); "
                "resume the run from its previous checkpoint (--resume RUN_DIR/previous.ckpt) or start it again"
            ) from err

    def write(self, cid: int, round_: int, state: dict[str, torch.Tensor]) -> None:
        if self.directory is None:
            self.version[cid] = round_
            return
        with uncut():  # a stop signal waits for the file to be whole
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{cid}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    torch.save(state, fh)
                    fh.flush()
                    os.fsync(fh.fileno())  # the data is on disk before any checkpoint can name it
                os.replace(tmp, self.directory / f"{cid}.r{round_}.pt")
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self.version[cid] = round_
            # Keep this version and those the last two checkpoints name; older files are unreferenced.
            keep = {round_, self.saved.get(cid, round_), self.saved_before.get(cid, round_)}
            for stale in self._on_disk.get(cid, set()) - keep:
                (self.directory / f"{cid}.r{stale}.pt").unlink(missing_ok=True)
            self._on_disk[cid] = (self._on_disk.get(cid, set()) & keep) | {round_}

    def snapshot(self) -> dict[str, Any]:
        """The version map a checkpoint records; the files it names are durable when this returns."""
        if self.directory is not None:
            fsync_directory(self.directory)  # the renames of this round's files
        self._pending = dict(self.version)
        return {"version": dict(self.version)}

    def committed(self) -> None:
        self.saved_before, self.saved = self.saved, self._pending
        if self.directory is None:
            return
        for cid, versions in self._on_disk.items():  # what neither of the last two checkpoints names
            keep = {self.version.get(cid, -1), self.saved.get(cid, -1), self.saved_before.get(cid, -1)}
            for stale in versions - keep:
                (self.directory / f"{cid}.r{stale}.pt").unlink(missing_ok=True)
            self._on_disk[cid] = versions & keep

    def restore(self, state: dict[str, Any]) -> None:
        self.version = {int(cid): int(v) for cid, v in state["version"].items()}
        missing = [str(self.path(cid, v)) for cid, v in self.version.items() if not self.path(cid, v).exists()]
        if missing:
            raise FileNotFoundError(
                f"the checkpoint names client files that are gone: {missing[:3]}{' ...' if len(missing) > 3 else ''}; "
                "the client files must stay beside the checkpoint (federation.client_store_dir)"
            )
        self.saved, self.saved_before = dict(self.version), {}
        self._on_disk = {cid: {v} for cid, v in self.version.items()}
        if self.directory is not None:  # versions a crashed run wrote, or older ones: known, so they get deleted
            for path in self.directory.glob("*.r*.pt"):
                cid, _, version = path.stem.partition(".r")
                if cid.isdigit() and version.isdigit():
                    self._on_disk.setdefault(int(cid), set()).add(int(version))


def damage(path: Path) -> str | None:
    """What is wrong with a client file, or None if it looks whole (a cheap check: no data is read)."""
    if not path.exists():
        return "missing"
    if path.stat().st_size == 0:
        return "empty"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut one lacks its directory
        return "truncated"
    return None


def damaged_files(state: Any, directory: Path) -> list[str]:
    """The client files a checkpoint's pool state names that are missing or damaged, as ``path (why)``."""
    if not isinstance(state, dict) or "version" not in state:
        return []  # the checkpoint holds the clients itself
    out = []
    for cid, version in sorted(state["version"].items()):
        path = directory / f"{cid}.r{version}.pt"
        why = damage(path)
        if why is not None:
            out.append(f"{path} ({why})")
    return out


class MemoryClients:
    """Every client in memory for the whole run (the default).

    Args:
        directory: where checkpoints keep the clients, a file for each client a round changed
            (so a checkpoint writes only what changed since the last one). None: checkpoints hold
            every client's state themselves.
        fallback: as for :class:`ClientFiles`.
    """

    def __init__(self, directory: str | Path | None = None, fallback: str | Path | None = None) -> None:
        self.clients: dict[int, FederatedClient] = {}  # built when first used, kept from then on
        self._build: Builder | None = None
        self._num_clients = 0
        self.files = (
            None
            if directory is None and fallback is None
            else ClientFiles(
                None if directory is None else Path(directory), None if fallback is None else Path(fallback)
            )
        )
        self.touched: set[int] = set()  # clients handed out this round

    def populate(self, build: Builder, num_clients: int) -> None:
        self._build, self._num_clients = build, num_clients
        self.clients = {}

    def __len__(self) -> int:
        return self._num_clients

    def _client(self, cid: int) -> FederatedClient:
        if cid not in self.clients:
            if not 0 <= cid < self._num_clients:
                raise IndexError(f"client {cid} is not in 0 .. {self._num_clients - 1}")  # ends iteration
            assert self._build is not None, "populate the pool first"
            self.clients[cid] = self._build(cid)
        return self.clients[cid]

    def __getitem__(self, cid: int) -> FederatedClient:
        client = self._client(cid)
        self.touched.add(cid)
        return client

    def visit(self, ids: Iterable[int]) -> Iterator[FederatedClient]:
        return (self._client(cid) for cid in ids)

    def release(self, round_: int) -> None:
        if self.files is not None:
            for cid in sorted(self.touched):
                self.files.write(cid, round_, self.clients[cid].state_dict())
        self.touched.clear()

    def state_dict(self) -> Any:
        if self.files is None:
            return [self._client(cid).state_dict() for cid in range(self._num_clients)]
        return self.files.snapshot()

    def load_state_dict(self, state: Any) -> None:
        self.touched.clear()
        if isinstance(state, list):  # a checkpoint that holds every client itself
            for cid, client_state in enumerate(state):
                self._client(cid).load_state_dict(client_state)
            return
        if self.files is None:
            raise ValueError("this checkpoint keeps its clients in files; build the pool with their directory")
        self.files.restore(state)
        for cid in self.files.version:
            self._client(cid).load_state_dict(self.files.read(cid))  # type: ignore[arg-type]

    def checkpoint_saved(self) -> None:
        if self.files is not None:
            self.files.committed()


class DiskClients:
    """Clients on local disk between rounds; only the round's clients are in memory.

    Args:
        directory: where the client files go (created if missing); None: a private temporary
            folder, removed when the pool is.
        fallback: as for :class:`ClientFiles`.
    """

    def __init__(self, directory: str | Path | None, fallback: str | Path | None = None) -> None:
        if directory is None:
            directory = tempfile.mkdtemp(prefix="fedmoe-clients-")
            weakref.finalize(self, shutil.rmtree, directory, ignore_errors=True)
        self.directory = Path(directory)
        self.files = ClientFiles(self.directory, None if fallback is None else Path(fallback))
        self.live: dict[int, FederatedClient] = {}
        self._build: Builder | None = None
        self._num_clients = 0

    def populate(self, build: Builder, num_clients: int) -> None:
        self._build, self._num_clients = build, num_clients

    def __len__(self) -> int:
        return self._num_clients

    def __getitem__(self, cid: int) -> FederatedClient:
        if cid not in self.live:
            self.live[cid] = self._load(cid)
        return self.live[cid]

    def visit(self, ids: Iterable[int]) -> Iterator[FederatedClient]:
        for cid in ids:
            yield self.live[cid] if cid in self.live else self._load(cid)

    def release(self, round_: int) -> None:
        for cid, client in sorted(self.live.items()):
            self.files.write(cid, round_, client.state_dict())
        self.live.clear()

    def state_dict(self) -> dict[str, Any]:
        if self.live:  # checkpoints happen between rounds
            raise RuntimeError(f"clients {sorted(self.live)} are still live; release the round first")
        return self.files.snapshot()

    def checkpoint_saved(self) -> None:
        self.files.committed()

    def load_state_dict(self, state: Any) -> None:
        if isinstance(state, list):
            raise ValueError(
                "the checkpoint holds every client's state itself (written by an earlier fedmoe-pl); resume it with "
                "federation.client_store: memory"
            )
        self.live.clear()
        self.files.restore(state)

    def _load(self, cid: int) -> FederatedClient:
        assert self._build is not None, "populate the pool first"
        if not 0 <= cid < self._num_clients:
            raise IndexError(f"client {cid} is not in 0 .. {self._num_clients - 1}")
        client = self._build(cid)
        state = self.files.read(cid)
        if state is not None:
            client.load_state_dict(state)
        return client


class ReadOnlyClients(Sequence[FederatedClient]):
    """A pool seen as a sequence that loads clients for reading: what :meth:`Algorithm.start` gets."""

    def __init__(self, pool: ClientPool) -> None:
        self.pool = pool

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, cid: int) -> FederatedClient:  # type: ignore[override]
        return next(self.pool.visit([cid]))
