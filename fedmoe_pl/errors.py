"""Why a run stopped: errors the user can act on, and interruptions by a signal.

The command line turns each into one line on stderr and an exit code: 2 for a configuration
refused before training, 1 for a :class:`RunError` during training, ``128 + N`` for signal N.
"""

from __future__ import annotations

import signal


class RunError(RuntimeError):
    """A run stopped for a reason the user can act on; the message says what happened and what to do."""


class ClientFailure(RunError):
    """A client's local fit raised, or produced a non-finite loss, in a given round."""

    def __init__(self, client_id: int, round_: int, cause: BaseException) -> None:
        self.client_id, self.round = client_id, round_  # the cause is the exception's __cause__
        super().__init__(
            f"client {client_id} failed in round {round_}: {type(cause).__name__}: {cause}. "
            "Set federation.on_client_error: drop to leave a failing client out of its round, "
            "or fix the cause and continue with --resume"
        )


class NobodyReported(RunError):
    """No client reported in ``rounds`` consecutive rounds (``limit``: ``federation.max_empty_rounds``,
    None: in the whole run) — every client failing, offline or unreachable."""

    def __init__(self, last_round: int, rounds: int, limit: int | None = None) -> None:
        where = (
            f"in any of the run's {rounds} rounds: nothing was trained"
            if limit is None
            else f"in {rounds} consecutive rounds ({last_round - rounds + 1}-{last_round}; "
            f"federation.max_empty_rounds={limit}): the clients keep failing or are unreachable"
        )
        then = "start again" if limit is None else "continue with --resume"
        super().__init__(
            f"no client reported {where}. metrics.jsonl lists the failed and dropped clients of each round; "
            f"fix the cause and {then}"
        )


class ClientUnreachable(ConnectionError):
    """A client in another process or machine that did not answer (it stopped, or its node left).

    The round goes on without it whatever ``federation.on_client_error`` says, as it does without a
    client that drops out: one lost site must not end a deployed federation."""


class Interrupted(BaseException):
    """A stop signal (SIGTERM, SIGINT, SIGUSR1) ended the run before its last round.

    A ``BaseException`` like ``KeyboardInterrupt``, so that ``except Exception`` (a client error
    contained by ``on_client_error: drop``) never swallows it.
    """

    def __init__(self, signum: int, final: bool = False) -> None:
        self.signum = signum
        self.final = final  # a stop that ends the run for good (a W&B sweep agent's), not a preemption
        self.round = 0  # the last completed round, filled in by whoever knows it
        super().__init__(self.name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by signal N."""
        return 128 + self.signum
