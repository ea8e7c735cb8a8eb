"""Where a run's clients live between rounds: all in memory, or on disk until sampled.

A pool hands the loop client ``cid`` as a LightningModule. The loop takes the round's clients
with ``pool[cid]`` (they stay live until :meth:`release` at the end of the round), reads others
with :meth:`visit` (evaluation: loaded, used, dropped), and saves the pool with every checkpoint.

:class:`DiskClients` keeps only the live clients in memory. Each client's state is a file per
version (``<cid>.r<round>.pt``, written when a round changed it); the checkpoint records which
version of each client is current, so a run killed half-way through writing a round resumes from
the versions its checkpoint names. A client that was never written is rebuilt from the random
state it was first built with: exactly the initial weights the in-memory pool would hold.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from fedmoe_pl.algorithms import FederatedClient

Builder = Callable[[int], FederatedClient]


class ClientPool(Protocol):
    def populate(self, build: Builder, num_clients: int) -> None:
        """Build clients ``0 .. num_clients - 1`` in order (the order fixes their initial weights)."""

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


class MemoryClients:
    """Every client in memory for the whole run (the default)."""

    def __init__(self) -> None:
        self.clients: list[FederatedClient] = []

    def populate(self, build: Builder, num_clients: int) -> None:
        self.clients = [build(cid) for cid in range(num_clients)]

    def __len__(self) -> int:
        return len(self.clients)

    def __getitem__(self, cid: int) -> FederatedClient:
        return self.clients[cid]

    def visit(self, ids: Iterable[int]) -> Iterator[FederatedClient]:
        return (self.clients[cid] for cid in ids)

    def release(self, round_: int) -> None:
        pass

    def state_dict(self) -> list[dict[str, Any]]:
        return [c.state_dict() for c in self.clients]

    def load_state_dict(self, state: Any) -> None:
        if not isinstance(state, list):
            raise ValueError(
                "the checkpoint keeps its clients on disk (federation.client_store: disk); resume it with that setting"
            )
        for client, client_state in zip(self.clients, state):
            client.load_state_dict(client_state)

    def checkpoint_saved(self) -> None:
        pass


class DiskClients:
    """Clients on local disk between rounds; only the round's clients are in memory.

    Args:
        directory: where the client files go (created if missing). At most two versions of a
            client are on disk at once: the one the last checkpoint names and a newer one.
            None: a private temporary folder, removed when the pool is.
        fallback: a folder to read a version from when ``directory`` lacks it: the store of the
            rank that writes the checkpoints, for the other ranks of a multi-process run.
    """

    def __init__(self, directory: str | Path | None, fallback: str | Path | None = None) -> None:
        if directory is None:
            directory = tempfile.mkdtemp(prefix="fedmoe-clients-")
            weakref.finalize(self, shutil.rmtree, directory, ignore_errors=True)
        self.directory = Path(directory)
        self.fallback = None if fallback is None else Path(fallback)
        self.version: dict[int, int] = {}  # cid -> round of its current file; absent: initial weights
        self.saved: dict[int, int] = {}  # the versions the last written checkpoint names
        self._pending: dict[int, int] = {}  # the versions of the checkpoint being written
        self.live: dict[int, FederatedClient] = {}
        self._build: Builder | None = None
        self._init_rng: list[torch.Tensor] = []  # the CPU random state each client was built from
        self._num_clients = 0
        self._files: dict[int, set[int]] = {}  # versions of each client known to be on disk

    def populate(self, build: Builder, num_clients: int) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._build, self._num_clients = build, num_clients
        self._init_rng = []
        for cid in range(num_clients):  # built and dropped: the random stream advances as in memory
            self._init_rng.append(torch.get_rng_state())
            build(cid)

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
            self._write(cid, round_, client)
        self.live.clear()

    def state_dict(self) -> dict[str, Any]:
        self._assert_idle()
        self._pending = dict(self.version)
        return {"store": "disk", "version": dict(self.version)}

    def checkpoint_saved(self) -> None:
        self.saved = self._pending
        for cid, files in self._files.items():  # what no checkpoint names any more
            for stale in files - {self.version[cid]}:
                self._path(cid, stale).unlink(missing_ok=True)
            self._files[cid] = {self.version[cid]}

    def load_state_dict(self, state: Any) -> None:
        if not (isinstance(state, dict) and state.get("store") == "disk"):
            raise ValueError(
                "the checkpoint keeps its clients in memory (federation.client_store: memory); resume it with that "
                "setting"
            )
        self.live.clear()
        self.version = {int(cid): int(v) for cid, v in state["version"].items()}
        missing = [str(self._path(cid, v)) for cid, v in self.version.items() if not self._source(cid, v).exists()]
        if missing:
            raise FileNotFoundError(
                f"the checkpoint names client files that are gone: {missing[:3]}{' ...' if len(missing) > 3 else ''}; "
                "the client store must stay beside the checkpoint (federation.client_store_dir)"
            )
        self.saved = dict(self.version)
        self._files = {cid: {v} for cid, v in self.version.items()}

    def _assert_idle(self) -> None:
        """Checkpoints happen between rounds: no client may be live then."""
        if self.live:
            raise RuntimeError(f"clients {sorted(self.live)} are still live; release the round first")

    # -- files ----------------------------------------------------------------------------------

    def _path(self, cid: int, version: int) -> Path:
        return self.directory / f"{cid}.r{version}.pt"

    def _source(self, cid: int, version: int) -> Path:
        path = self._path(cid, version)
        if self.fallback is not None and not path.exists():
            return self.fallback / path.name
        return path

    def _load(self, cid: int) -> FederatedClient:
        assert self._build is not None, "populate the pool first"
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._init_rng[cid])
            client = self._build(cid)
        if cid in self.version:
            client.load_state_dict(torch.load(self._source(cid, self.version[cid]), map_location="cpu"))
        return client

    def _write(self, cid: int, round_: int, client: FederatedClient) -> None:
        path = self._path(cid, round_)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{cid}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(client.state_dict(), fh)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.version[cid] = round_
        # Keep this version and the one the last checkpoint names; older files are unreferenced.
        keep = {round_, self.saved.get(cid, round_)}
        for stale in self._files.get(cid, set()) - keep:
            self._path(cid, stale).unlink(missing_ok=True)
        self._files[cid] = (self._files.get(cid, set()) & keep) | {round_}


class ReadOnlyClients(Sequence[FederatedClient]):
    """A pool seen as a sequence that loads clients for reading: what :meth:`Algorithm.start` gets."""

    def __init__(self, pool: ClientPool) -> None:
        self.pool = pool

    def __len__(self) -> int:
        return len(self.pool)

    def __getitem__(self, cid: int) -> FederatedClient:  # type: ignore[override]
        return next(self.pool.visit([cid]))
