"""fedmoe-pl as a Flower app: the same clients and methods over real message passing.

``pip install 'fedmoe-pl[flower]'`` (Flower needs Python 3.11 or newer). The ServerApp
(:mod:`fedmoe_pl.flower.server`) runs the federation's round loop with the configured
:class:`~fedmoe_pl.algorithms.Algorithm`, and writes the run directory, metrics and W&B as
``fedmoe-pl fit`` does; each SuperNode's ClientApp (:mod:`fedmoe_pl.flower.client`) holds one
client (its ``partition-id``), trains it with the same executor as a simulation and evaluates it.
What travels is what the method's ``upload``/``download`` say. :mod:`fedmoe_pl.flower.local`
starts a SuperLink and one SuperNode per client on this machine.
"""

from __future__ import annotations


def require_flower() -> None:
    """Refuse clearly when Flower is not installed."""
    try:
        import flwr  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "the Flower adapter needs flwr: pip install 'fedmoe-pl[flower]' (Flower supports Python 3.11 and newer)"
        ) from err
