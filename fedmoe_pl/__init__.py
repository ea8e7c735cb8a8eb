"""fedmoe-pl: pFedMoE and its baselines as PyTorch Lightning modules under one federation loop.

The package, by what each part serves:

- ``algorithms``, ``models``, ``data``: the methods (a client class and a server side each), the
  model zoos (images, table rows, texts), and the datasets with their federated partitions and the
  description of one input sample (``data.inputs``) that models are built from;
- ``run``: a run and its loop — the round loop (``federation``), its schedule, the run directory,
  the sinks (metrics file, checkpoint, W&B, Lightning loggers), stop signals, the experiment built
  from a config;
- ``fleets``: where clients live and how they train — the ``Fleet`` seam, the in-process fleet, the
  sequential and batched executors, the client pool and disk store, ranks over torch.distributed;
- ``flower``: clients on Flower SuperNodes;
- ``cluster``: grids (locally or as Slurm job arrays) and W&B sweeps;
- ``analysis``: evaluation, training FLOPs, pictures, the partition report and the results table;
- ``cli``, ``errors``, ``aggregation``: the command line, the errors a user acts on, the server's
  arithmetic.

Modules that lived at the top level before (``fedmoe_pl.federation``, ``fedmoe_pl.executor``, ...)
still import under their old names: each old name is the moved module itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
from types import CodeType, ModuleType

__version__ = "0.1.0"

_GROUPS = {
    "run": ("federation", "schedule", "rundir", "sinks", "signals", "tracking", "experiment", "trainer_settings"),
    "fleets": ("fleet", "in_process", "executor", "batched", "stacked_sgd", "clients", "distributed", "rank_watch"),
    "cluster": ("grid", "slurm", "sweep"),
    "analysis": ("evaluation", "flops", "plots", "report", "results"),
}
MOVED = {
    f"{__name__}.{module}": f"{__name__}.{group}.{module}" for group, modules in _GROUPS.items() for module in modules
}


class _OldNames(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports a module's old top-level name as the module at its new place (the same object)."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def __init__(self) -> None:
        self.specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(MOVED[spec.name])
        self.specs[module.__name__] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self.specs[module.__name__]  # the import system gave it the old name's spec meanwhile

    def get_code(self, name: str) -> CodeType | None:
        """The moved module's code: ``python -m fedmoe_pl.slurm`` (an older grid's job script) still runs."""
        spec = importlib.util.find_spec(MOVED[name])
        loader = None if spec is None else spec.loader
        return loader.get_code(MOVED[name]) if isinstance(loader, importlib.abc.InspectLoader) else None


sys.meta_path.append(_OldNames())
