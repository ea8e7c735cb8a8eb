"""The package's folders: modules grouped by what they serve, old import names kept."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import fedmoe_pl

PACKAGE = Path(fedmoe_pl.__file__).resolve().parent


def test_the_top_level_holds_only_the_entry_points_and_the_groups() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules == {"__init__", "cli", "errors", "aggregation"}
    groups = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert {"run", "fleets", "cluster", "analysis", "algorithms", "models", "data", "flower"} <= groups


def test_every_old_module_name_imports_the_moved_module_itself() -> None:
    assert len(fedmoe_pl.MOVED) == 24
    for old, new in fedmoe_pl.MOVED.items():
        module = importlib.import_module(old)
        assert module is importlib.import_module(new), old
        assert module.__name__ == new and module.__spec__.name == new
        assert (PACKAGE.parent / (new.replace(".", "/") + ".py")).exists()
    from fedmoe_pl.executor import SequentialExecutor

    from fedmoe_pl.fleets.executor import SequentialExecutor as Moved

    assert SequentialExecutor is Moved


def test_old_names_import_in_a_fresh_interpreter_before_the_new_ones() -> None:
    code = (
        "from fedmoe_pl.federation import Federation; import fedmoe_pl.rundir as r; "
        "import fedmoe_pl.run.federation as f; assert f.Federation is Federation; print(r.__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "fedmoe_pl.run.rundir"


def test_an_old_module_name_still_runs_with_python_m() -> None:
    """A grid's job script written before the move runs ``python -m fedmoe_pl.slurm``."""
    done = subprocess.run([sys.executable, "-m", "fedmoe_pl.slurm"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "usage: python -m fedmoe_pl.cluster.slurm" in done.stderr
