"""Seeded non-IID partitioners.

A partitioner decides *how many* samples of each class every client gets — a (clients, classes)
count matrix — and :func:`assign` then deals out concrete indices. Splitting the decision this way
lets the ``paper`` convention give a client's test set the same class mix as its training set
(:func:`scale_counts`), and keeps every partitioner free of index bookkeeping.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Partitioner(ABC):
    """Decides per-client, per-class sample counts."""

    def check(self, num_classes: int, num_clients: int) -> None:
        """Raise on settings that cannot work, before any data is touched."""
        if num_clients < 1:
            raise ValueError(f"num_clients must be at least 1, got {num_clients}")

    @abstractmethod
    def counts(self, class_counts: np.ndarray, num_clients: int, rng: np.random.Generator) -> np.ndarray:
        """Return an int (num_clients, num_classes) matrix whose column c sums to at most class_counts[c]."""


def _largest_remainder(total: int, shares: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Split ``total`` items in proportion to ``shares``; leftovers go to the largest remainders.

    Ties (equal shares) are broken at random, so leftovers never pile up on the first client.
    """
    if total == 0 or shares.sum() == 0:
        return np.zeros(len(shares), dtype=np.int64)
    exact = shares / shares.sum() * total
    base = np.floor(exact).astype(np.int64)
    left = total - int(base.sum())
    if left:
        jitter = rng.random(len(shares)) * 1e-9
        order = np.argsort(-(exact - base + jitter), kind="stable")
        base[order[:left]] += 1
    return base


class IID(Partitioner):
    """Every client gets an (almost) equal share of every class."""

    def counts(self, class_counts: np.ndarray, num_clients: int, rng: np.random.Generator) -> np.ndarray:
        ones = np.ones(num_clients)
        return np.stack([_largest_remainder(int(n), ones, rng) for n in class_counts], axis=1)


class Pathological(Partitioner):
    """Each client holds a fixed number of classes: the same for all, or its own.

    Assignment rule: client i holds the ``k_i`` classes ``(o_i + j) mod C`` for ``j < k_i``, where
    ``o_i = k_0 + ... + k_{i-1}``: consecutive clients take consecutive blocks of classes and, with one
    count ``k`` and ``N * k`` a multiple of ``C``, every class has the same number of holders. A
    class's samples are then split among its holders, equally (``balanced``) or in shares drawn
    uniformly from the simplex.

    Args:
        classes_per_client: the classes each client holds: one count ``k`` for every client; two
            counts ``[low, high]``, each client's drawn uniformly from ``low`` to ``high`` (both
            included) from the run's seed; or one count per client (a list of ``num_clients``
            counts, when that is not 2: a list of two is always the range).
        balanced: equal shares of a class for its holders, else random shares.
    """

    def __init__(self, classes_per_client: int | list[int] = 2, balanced: bool = True) -> None:
        self.classes_per_client = classes_per_client
        self.balanced = balanced

    @property
    def drawn(self) -> bool:
        """Whether each client's count is drawn from a range."""
        return isinstance(self.classes_per_client, list | tuple) and len(self.classes_per_client) == 2

    def check(self, num_classes: int, num_clients: int) -> None:
        super().check(num_classes, num_clients)
        given = self.classes_per_client
        counts = list(given) if isinstance(given, list | tuple) else [given]
        if isinstance(given, list | tuple) and not self.drawn and len(counts) != num_clients:
            raise ValueError(
                f"classes_per_client lists {len(counts)} counts for {num_clients} clients; give one count, "
                f"[low, high] (each client's drawn from that range), or one count per client ({num_clients})"
            )
        if self.drawn and counts[0] > counts[1]:
            raise ValueError(f"classes_per_client={counts} is a range [low, high] with low above high; swap them")
        for k in counts:
            if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= num_classes:
                raise ValueError(
                    f"classes_per_client={given} but the data has {num_classes} classes; every count must be "
                    f"between 1 and {num_classes}"
                )

    def client_counts(self, num_clients: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """Each client's number of classes (a range is drawn from ``rng``, the partition's stream)."""
        given = self.classes_per_client
        if not isinstance(given, list | tuple):
            return np.full(num_clients, int(given), dtype=np.int64)
        if not self.drawn:
            return np.asarray(given, dtype=np.int64)
        if rng is None:
            raise ValueError("a range of classes_per_client is drawn from the partition's random stream")
        low, high = int(given[0]), int(given[1])
        return rng.integers(low, high + 1, size=num_clients).astype(np.int64)

    def holdings(self, num_classes: int, num_clients: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """Boolean (clients, classes) matrix of which client holds which class."""
        ks = self.client_counts(num_clients, rng)
        offsets = np.concatenate([[0], np.cumsum(ks)[:-1]])
        held = np.zeros((num_clients, num_classes), dtype=bool)
        for i, (k, offset) in enumerate(zip(ks, offsets)):
            held[i, (offset + np.arange(k)) % num_classes] = True
        return held

    def counts(self, class_counts: np.ndarray, num_clients: int, rng: np.random.Generator) -> np.ndarray:
        held = self.holdings(len(class_counts), num_clients, rng)
        out = np.zeros(held.shape, dtype=np.int64)
        for c, n in enumerate(class_counts):
            shares = held[:, c].astype(float)
            if not self.balanced:
                shares[held[:, c]] = rng.dirichlet(np.ones(held[:, c].sum()))
            out[:, c] = _largest_remainder(int(n), shares, rng)
        return out


class Dirichlet(Partitioner):
    """Each class is spread over clients with proportions drawn from Dir(alpha).

    Every client is guaranteed ``min_samples`` samples without redrawing: after one draw, clients
    short of the minimum take samples from the client that has the most. Each move transfers at
    least one sample, so the repair ends after at most ``num_clients * min_samples`` moves.

    Args:
        alpha: concentration; small values give skewed label mixes (0.1 is the peers' default).
        min_samples: smallest number of samples any client may end up with.
    """

    def __init__(self, alpha: float = 0.1, min_samples: int = 10) -> None:
        self.alpha = alpha
        self.min_samples = min_samples

    def check(self, num_classes: int, num_clients: int) -> None:
        super().check(num_classes, num_clients)
        if not self.alpha > 0:
            raise ValueError(f"Dirichlet alpha must be > 0, got {self.alpha}; 0.1 to 1.0 are usual")
        if self.min_samples < 0:
            raise ValueError(f"min_samples must be >= 0, got {self.min_samples}")

    def counts(self, class_counts: np.ndarray, num_clients: int, rng: np.random.Generator) -> np.ndarray:
        total = int(class_counts.sum())
        if num_clients * self.min_samples > total:
            raise ValueError(
                f"min_samples={self.min_samples} for {num_clients} clients needs "
                f"{num_clients * self.min_samples} samples but the data has {total}; lower "
                "min_samples or num_clients"
            )
        out = np.stack(
            [_largest_remainder(int(n), rng.dirichlet(np.full(num_clients, self.alpha)), rng) for n in class_counts],
            axis=1,
        )
        sizes = out.sum(1)
        for i in np.flatnonzero(sizes < self.min_samples):
            while sizes[i] < self.min_samples:
                donor = int(np.argmax(sizes))
                c = int(np.argmax(out[donor]))
                moved = int(min(self.min_samples - sizes[i], out[donor, c], sizes[donor] - self.min_samples))
                out[donor, c] -= moved
                out[i, c] += moved
                sizes[donor] -= moved
                sizes[i] += moved
        return out


class Natural(Partitioner):
    """Each site of the data (a hospital, say) is one client, with all of its samples: the federation
    the data already is. Needs a source whose samples name their site (``HeartDisease``) and
    ``num_clients`` equal to its number of sites; client ``i`` is site ``i`` in the source's order.
    """

    def counts(self, class_counts: np.ndarray, num_clients: int, rng: np.random.Generator) -> np.ndarray:
        raise TypeError("the Natural partition follows the data's sites, not class counts; see FederatedDataModule")

    @staticmethod
    def check_sites(sites: list[str] | None, num_clients: int, source: str) -> list[str]:
        """The data's site names, once they are known to make ``num_clients`` clients."""
        if not sites:
            raise ValueError(
                f"data.partitioner Natural makes one client per site of the data, but {source} has no sites; "
                "use Pathological, Dirichlet or IID"
            )
        if num_clients != len(sites):
            raise ValueError(
                f"data.partitioner Natural makes one client per site and the data has {len(sites)} "
                f"({', '.join(sites)}), but num_clients={num_clients}; set data.num_clients: {len(sites)}"
            )
        return sites

    @staticmethod
    def split(sites: np.ndarray, num_clients: int) -> list[np.ndarray]:
        """Each client's sorted sample indices: those of its site."""
        return [np.flatnonzero(sites == i).astype(np.int64) for i in range(num_clients)]


def scale_counts(reference: np.ndarray, class_counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Counts for another set (the test set) with each class split like ``reference``'s column."""
    return np.stack(
        [_largest_remainder(int(n), reference[:, c].astype(float), rng) for c, n in enumerate(class_counts)],
        axis=1,
    )


def assign(labels: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """Deal out sorted, disjoint index arrays, client i receiving ``counts[i, c]`` samples of class c."""
    clients = counts.shape[0]
    owners, dealt = [], []
    for c in range(counts.shape[1]):
        idx = rng.permutation(np.flatnonzero(labels == c))
        dealt.append(idx[: counts[:, c].sum()])
        owners.append(np.repeat(np.arange(clients), counts[:, c]))  # client i takes the next counts[i, c]
    owner, index = np.concatenate(owners), np.concatenate(dealt).astype(np.int64)
    order = np.lexsort((index, owner))  # by client, then by sample index
    bounds = np.cumsum(np.bincount(owner, minlength=clients))[:-1]
    return np.split(index[order], bounds)
