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

_active: list[StopSignals] = []  # the handlers in force, innermost last (signal handlers run in the main thread)


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
            _active.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self in _active:
            _active.remove(self)

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


@contextmanager
def uncut() -> Iterator[None]:
    """A write inside abandonable work (a client's file saved mid-round) that a stop signal must not cut.

    A signal that arrives during it is acted on once it is done. Raising from the middle of a
    library's write (``torch.save``) can make the library's own clean-up fail and hide the stop
    behind that error, so that a stopped run would report itself failed.
    """
    if not _active or threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = _active[-1]
    was = stops._abandonable
    stops._abandonable = False
    try:
        yield
    finally:
        stops._abandonable = was and stops.signum is None
    if was and stops.signum is not None:
        raise Interrupted(stops.signum, stops.signum in stops.final)


def stop_behind(err: BaseException) -> Interrupted | None:
    """The stop signal an error was raised while handling, if any: a stop that surfaced as another error."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, Interrupted):
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None
