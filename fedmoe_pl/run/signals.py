"""Stop signals: end the current round cleanly instead of dying mid-write.

Schedulers send SIGTERM (SLURM also SIGUSR1 with ``--signal``) before they kill a job; a user
presses Ctrl-C. Work that a resumption redoes anyway (local fits, evaluation) is abandoned at
once; writes (metrics, checkpoint) are never cut: a signal that arrives during one is acted on
when it is done. Either way the run directory keeps its last complete checkpoint.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from fedmoe_pl.errors import Interrupted

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# How a W&B sweep agent stops a run (early termination, a stop from the UI, Ctrl-C on the agent).
# SIGUSR1 stays a preemption: Slurm sends it before a time limit, and the run requeues itself.
AGENT_STOPS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Catch the stop signals while active (a context manager); restore the old handlers after.

    Lightning adds its own SIGTERM handler during ``Trainer.fit`` and calls the one it found, so
    a SIGTERM inside a local fit reaches this class too.

    Args:
        final: signals that end the run for good rather than interrupt it for a later resumption
            (under a W&B sweep agent, which stops a run with SIGTERM, say).
    """

    def __init__(self, final: tuple[int, ...] = ()) -> None:
        self.final = tuple(final)
        self.signum: int | None = None
        self._abandonable = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # signal.signal's rule
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        if self._abandonable:
            self._abandonable = False  # raise once; the unwinding must not be interrupted again
            raise Interrupted(self.signum, self.signum in self.final)

    def check(self) -> None:
        """Raise :class:`Interrupted` if a stop signal has arrived."""
        if self.signum is not None:
            raise Interrupted(self.signum, self.signum in self.final)

    @contextmanager
    def abandonable(self) -> Iterator[None]:
        """A stretch of work that a stop signal may cut short: nothing in it is written to disk."""
        self.check()
        self._abandonable = True
        try:
            yield
        finally:
            self._abandonable = False
