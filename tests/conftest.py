import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

# No test may talk to W&B's servers; tests that want an offline run set WANDB_MODE themselves.
os.environ["WANDB_MODE"] = "disabled"
os.environ["WANDB_SILENT"] = "true"

import pytest
import torch

from fedmoe_pl.fleets.executor import quiet_lightning

quiet_lightning()
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


SLURM_SCRIPTS = Path(__file__).parent / "slurm"


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[dict[str, str]]:
    """A one-node Slurm cluster of this session; yields the environment its commands need."""
    missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol") if shutil.which(b) is None]
    if missing:
        pytest.skip(
            f"Slurm is not installed ({', '.join(missing)} missing): run bash scripts/test.sh as root, or "
            "apt-get install slurm-wlm munge"
        )
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster runs its daemons as root")
    # Directly under /tmp: munge's socket path must be short and every folder above it o+x.
    folder = tempfile.mkdtemp(prefix="slurm.", dir="/tmp")
    ctld, slurmd = _free_ports(2)
    env = dict(os.environ, CTLD_PORT=str(ctld), SLURMD_PORT=str(slurmd))
    try:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "start.sh"), folder], env=env, check=True, timeout=60)
        yield dict(os.environ, SLURM_CONF=os.path.join(folder, "slurm.conf"))
    finally:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop.sh"), folder], timeout=60, check=False)
