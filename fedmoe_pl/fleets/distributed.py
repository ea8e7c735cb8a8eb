"""One experiment in several processes: every rank runs the same loop, each trains its share of a round.

Launched by ``torchrun`` or by ``srun`` (one task per process), every rank reads the same config,
builds the same clients from the same seed and draws the same schedule. In each round the sampled
clients are split across ranks, balanced by training samples; each rank trains its share with the
usual per-client Trainer; then one ``all_gather`` gives every rank every client's result and the
new state of every client trained elsewhere. Every rank thus aggregates the same results in the
same order, exactly as a single process does, and holds every client's state: rank 0 evaluates
and writes the run directory, checkpoints and W&B; the others write nothing.

``gloo`` carries the messages on CPUs, ``nccl`` on GPUs (each rank on the GPU of its local rank).
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import ClusterEnvironment

from fedmoe_pl.fleets.executor import Executor, FitJob, FitOutcome
from fedmoe_pl.fleets.rank_watch import RankWatch

T = TypeVar("T")

DEFAULT_PORT_BASE = 29500  # srun launches without a shared folder for the rendezvous: base of a port from the ids


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place in a multi-process run."""

    rank: int
    world_size: int
    local_rank: int

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env(env: dict[str, str] | None = None) -> ProcessGroup | None:
        """The group a launcher set up (``torchrun``: RANK/WORLD_SIZE; ``srun -n K``: SLURM_PROCID/NTASKS).

        None for a single process, including a single-task Slurm step.
        """
        env = dict(os.environ if env is None else env)
        if "RANK" in env and "WORLD_SIZE" in env:
            group = ProcessGroup(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
        elif int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:  # set by srun for the tasks of its step
            tasks = int(env["SLURM_STEP_NUM_TASKS"])
            group = ProcessGroup(int(env["SLURM_PROCID"]), tasks, int(env.get("SLURM_LOCALID", "0")))
        else:
            return None
        return group if group.world_size > 1 else None

    def cuda_index(self) -> int:
        """The GPU of this rank among those it sees: its local rank when it sees one per local rank,
        else the one (or one of those) Slurm's binding or ``CUDA_VISIBLE_DEVICES`` left it."""
        count = torch.cuda.device_count()
        return self.local_rank if count > self.local_rank else self.local_rank % max(count, 1)

    def start(self, use_cuda: bool, rendezvous_dir: str | Path | None = None) -> RankWatch:
        """Join the group (``nccl`` with each rank on its GPU, else ``gloo``) and start the watch that
        makes every rank stop when one fails (:mod:`fedmoe_pl.fleets.rank_watch`).

        Under ``srun`` without ``MASTER_ADDR``/``MASTER_PORT``, rank 0 picks a free port on the step's
        first node and passes it through a file in ``rendezvous_dir`` (a folder every node sees):
        two steps or jobs on one node never share a port.
        """
        if "MASTER_ADDR" not in os.environ:  # srun: the step's first node
            os.environ["MASTER_ADDR"] = _first_host(os.environ.get("SLURM_STEP_NODELIST", "localhost"))
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(self._rendezvous_port(rendezvous_dir))
        if use_cuda:
            torch.cuda.set_device(self.cuda_index())
        dist.init_process_group(
            "nccl" if use_cuda else "gloo",
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(minutes=30),
        )
        if self.leader and rendezvous_dir is not None:
            _rendezvous_file(rendezvous_dir).unlink(missing_ok=True)  # every rank has joined
        return RankWatch(dist.distributed_c10d._get_default_store(), self.rank, self.world_size).start()

    def _rendezvous_port(self, folder: str | Path | None) -> int:
        job, step = int(os.environ.get("SLURM_JOB_ID", "0")), int(os.environ.get("SLURM_STEP_ID", "0") or 0)
        if folder is None:
            return DEFAULT_PORT_BASE + (job % 1000) * 8 + step % 8
        path = _rendezvous_file(folder)
        if self.leader:
            with socket.socket() as probe:
                probe.bind(("", 0))
                port = int(probe.getsockname()[1])
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(str(port))
            os.replace(tmp, path)
            return port
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if path.exists() and (text := path.read_text().strip()):
                return int(text)
            time.sleep(0.2)
        raise RuntimeError(f"rank {self.rank}: rank 0 did not publish its rendezvous port in {path} within 300 s")

    def stop(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def agree(self, check: Callable[[], T]) -> T:
        """Run ``check`` on every rank; if it raised on any rank, every rank raises that error.

        Keeps a run's ranks together when a setting or file is bad: no rank waits forever for one
        that gave up.
        """
        error: Exception | None = None
        value: T | None = None
        try:
            value = check()
        except Exception as err:
            error = err
        errors: list[Any] = [None] * self.world_size
        dist.all_gather_object(errors, None if error is None else (type(error).__name__, str(error)))
        if error is not None:
            raise error
        for rank, reported in enumerate(errors):
            if reported is not None:
                kind, message = reported
                raise _REFUSALS.get(kind, RuntimeError)(message if kind in _REFUSALS else f"rank {rank}: {message}")
        return value  # type: ignore[return-value]


_REFUSALS: dict[str, type[Exception]] = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}


def is_leader() -> bool:
    """Whether this process speaks for the run: a single process, or rank 0 of several."""
    group = ProcessGroup.from_env()
    return group is None or group.leader


def _rendezvous_file(folder: str | Path) -> Path:
    job, step = os.environ.get("SLURM_JOB_ID", "0"), os.environ.get("SLURM_STEP_ID", "0")
    return Path(folder) / f".rendezvous-{job}.{step}"


def _first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``node[01-04]`` -> ``node01``)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0]


class SingleProcessEnvironment(ClusterEnvironment):
    """What a per-client Trainer sees inside one rank: a world of one process.

    Without it Lightning would read the launcher's variables (RANK, WORLD_SIZE, SLURM_NTASKS) and
    try to set up a distributed fit of its own around a single client.
    """

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return "127.0.0.1"

    @property
    def main_port(self) -> int:
        return 0

    @staticmethod
    def detect() -> bool:
        return False

    def world_size(self) -> int:
        return 1

    def set_world_size(self, size: int) -> None:
        pass

    def global_rank(self) -> int:
        return 0

    def set_global_rank(self, rank: int) -> None:
        pass

    def local_rank(self) -> int:
        return 0

    def node_rank(self) -> int:
        return 0


def assign(sizes: Sequence[int], world_size: int) -> list[list[int]]:
    """Job indices per rank, balanced by training samples (largest first to the least loaded rank).

    A pure function of the sizes, so every rank computes the same split.
    """
    load = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        shares[rank].append(index)
        load[rank] += sizes[index]
    return [sorted(share) for share in shares]


def _portable(err: Exception) -> Exception:
    """The error itself if it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


class DistributedExecutor:
    """Trains this rank's share of each round with ``inner`` and shares the outcomes with every rank.

    Args:
        inner: the executor of this rank's share (one Trainer per client, in turn).
        group: the process group (already started).
    """

    def __init__(self, inner: Executor, group: ProcessGroup) -> None:
        self.inner, self.group = inner, group
        self.stats: dict[str, Any] = {}  # of the last fit: the samples each rank trained

    def fit(self, jobs: Sequence[FitJob]) -> Iterator[FitOutcome]:
        sizes = [job.data.num_train for job in jobs]
        shares = assign(sizes, self.group.world_size)
        self.stats = {"rank_train_samples": [sum(sizes[i] for i in share) for share in shares]}
        mine = shares[self.group.rank]
        sent = []
        for index, outcome in zip(mine, self.inner.fit([jobs[i] for i in mine])):
            state = jobs[index].client.state_dict() if outcome.result is not None else None
            error = None if outcome.error is None else _portable(outcome.error)
            sent.append((index, FitOutcome(outcome.client_id, outcome.result, error), state))
        gathered: list[Any] = [None] * self.group.world_size
        dist.all_gather_object(gathered, sent)
        outcomes: dict[int, FitOutcome] = {}
        for rank, part in enumerate(gathered):
            for index, outcome, state in part:
                if rank != self.group.rank and state is not None:  # keep this rank's copy of the client current
                    jobs[index].client.load_state_dict(state)
                outcomes[index] = outcome
        for index in range(len(jobs)):
            yield outcomes[index]

    def round_stats(self) -> dict[str, Any]:
        return {**self.inner.round_stats(), **self.stats}
