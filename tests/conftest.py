import os

# No test may talk to W&B's servers; tests that want an offline run set WANDB_MODE themselves.
os.environ["WANDB_MODE"] = "disabled"
os.environ["WANDB_SILENT"] = "true"

import pytest
import torch

from fedmoe_pl.federation import quiet_lightning

quiet_lightning()
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)
