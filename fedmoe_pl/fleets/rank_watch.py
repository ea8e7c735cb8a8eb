"""Ranks fail together: a failure on any rank of a multi-process run stops every rank within seconds.

Start-up refusals reach every rank through :meth:`ProcessGroup.agree`. Later, a rank that fails
(an exception in evaluation, a full disk while rank 0 checkpoints, an out-of-memory) would leave
the others blocked in the next collective until its timeout, holding their GPUs idle. So every rank
runs a small watcher thread over the process group's key-value store (the one the rendezvous set
up): a failing rank writes its one-line reason there; each watcher polls for it, and for the
heartbeats of the other ranks (a rank killed outright writes nothing), and ends its own process
with exit code 1, rank 0 saying which rank failed and why. Watchers cannot unblock a collective, so
they end the process with ``os._exit`` once the failure is reported; the last checkpoint is intact.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

FAILED, BEAT, DONE, ACK = "fedmoe_pl/failed", "fedmoe_pl/beat/", "fedmoe_pl/done/", "fedmoe_pl/ack/"
_active: RankWatch | None = None


def active() -> RankWatch | None:
    """The watch of this process's run, while one runs."""
    return _active


class RankWatch:
    """The watcher of one rank (see the module docstring).

    Args:
        store: the process group's store (``set``, ``get``, ``check``, ``add``).
        rank, world_size: this rank and how many there are.
        interval: seconds between two looks at the store.
        silent_after: a rank whose heartbeat has not moved for this long is taken as gone.
        exit: how the process ends (``os._exit``; tests replace it).
    """

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        interval: float = 0.5,
        silent_after: float = 60.0,
        exit: Callable[[int], Any] = os._exit,
    ) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.interval, self.silent_after, self._exit = interval, silent_after, exit
        self.hooks: list[Callable[[str], None]] = []  # run before the process ends (rank 0: the summary)
        self.finishing = False  # this rank's run has ended normally: a vanished store is no failure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="fedmoe-rank-watch", daemon=True)
        self._beats: dict[int, tuple[int, float]] = {}  # rank -> (last count seen, when it last moved)

    def start(self) -> RankWatch:
        global _active
        _active = self
        self._thread.start()
        return self

    def report(self, reason: str) -> None:
        """This rank failed: tell the others, and give them a moment to read it before it exits."""
        message = f"rank {self.rank} failed: {reason}"
        try:
            if not self.store.check([FAILED]):
                self.store.set(FAILED, message)
            deadline = time.monotonic() + 5.0
            others = [r for r in range(self.world_size) if r != self.rank]
            while time.monotonic() < deadline and not all(self.store.check([f"{ACK}{r}"]) for r in others):
                time.sleep(0.1)
        except Exception as err:  # the store went with another rank: nobody is left to tell
            log.debug("could not report the failure to the other ranks: %s", err)

    def finish(self) -> None:
        """This rank's run ended normally; rank 0 waits for the others, whose watchers need its store."""
        self.finishing = True
        with contextlib.suppress(Exception):
            self.store.set(f"{DONE}{self.rank}", "1")
            if self.rank == 0:
                deadline = time.monotonic() + 60.0
                while time.monotonic() < deadline and not all(
                    self.store.check([f"{DONE}{r}"]) for r in range(1, self.world_size)
                ):
                    if self.store.check([FAILED]):
                        break
                    time.sleep(0.1)
        self.stop()

    def stop(self) -> None:
        global _active
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        if _active is self:
            _active = None

    # -- the thread -------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                reason = self._look()
            except Exception as err:  # the store lives in rank 0's process: it is gone
                if self.finishing or self._stop.is_set():
                    return
                reason = f"rank 0 is gone (its store cannot be reached: {type(err).__name__})"
            if reason is not None and not self._stop.is_set():
                self._end(reason)
                return

    def _look(self) -> str | None:
        """Another rank's failure, or None."""
        self.store.add(f"{BEAT}{self.rank}", 1)
        if self.store.check([FAILED]):
            message = self.store.get(FAILED).decode()
            return None if message.startswith(f"rank {self.rank} failed") else message
        now = time.monotonic()
        for rank in range(self.world_size):
            if rank == self.rank or self.store.check([f"{DONE}{rank}"]):
                continue
            count = int(self.store.add(f"{BEAT}{rank}", 0))
            last, since = self._beats.get(rank, (-1, now))
            if count != last:
                self._beats[rank] = (count, now)
            elif now - since > self.silent_after:
                return f"rank {rank} is gone (no sign of life for {self.silent_after:.0f} s)"
        return None

    def _end(self, reason: str) -> None:
        with contextlib.suppress(Exception):
            self.store.set(f"{ACK}{self.rank}", "1")
        for hook in self.hooks:
            try:
                hook(reason)
            except Exception as err:
                log.error("while stopping after another rank's failure: %s", err)
        where = "every rank stops" if self.rank == 0 else f"rank {self.rank} stops too"
        print(f"fedmoe-pl fit: error: {reason}; {where}", file=sys.stderr, flush=True)
        self._exit(1)
