"""fedmoe-pl installed from its wheel, outside the checkout: the shipped configs and the Flower app come along."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _site_packages(prefix: Path) -> Path:
    return next((prefix / "lib").glob("python*/site-packages"))


@pytest.mark.slow
def test_the_installed_wheel_runs_fit_grid_report_and_the_flower_launcher_outside_the_checkout(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("fedmoe_pl-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    # The dependencies (torch, Lightning, ...) come from this environment, after the fresh one's own
    # packages: a path line in a .pth file, which adds no other .pth (not this checkout's editable install).
    ours = Path(next(p for p in sys.path if p.endswith("site-packages")))
    (_site_packages(venv) / "dependencies.pth").write_text(f"{ours}\n")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)]
    subprocess.run(pip, check=True, timeout=300)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(WANDB_MODE="disabled", PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}")

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(argv, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)

    where = run("python", "-c", "import fedmoe_pl; print(fedmoe_pl.__file__)")
    assert where.stdout.strip().startswith(str(venv)), where.stdout + where.stderr  # the wheel, not the checkout

    config = tiny_config(tmp_path)
    fit = run("fedmoe-pl", "fit", "--config", str(config), "--federation.run_dir", "run")
    assert fit.returncode == 0, fit.stderr[-3000:]
    assert (elsewhere / "run" / "summary.json").exists()

    shipped = run("fedmoe-pl", "fit", "--config", "configs/quickstart.yaml", "--print_config")
    assert shipped.returncode == 0 and "fedmoe_pl.algorithms.PFedMoE" in shipped.stdout, shipped.stderr[-2000:]

    grid = run("fedmoe-pl", "grid", "configs/grids/sample.yaml", "--dry-run")
    cells = 2 * len(list((ROOT / "configs" / "methods").glob("*.yaml"))) * 3  # 2 datasets x methods x 3 seeds
    assert grid.returncode == 0 and grid.stdout.startswith(f"{cells} cells"), grid.stderr[-2000:]
    assert str(venv) in grid.stdout  # the overlays it names are the installed ones

    report = run("fedmoe-pl", "report", "run", "--output", "report")
    assert report.returncode == 0 and (elsewhere / "report" / "report.md").exists(), report.stderr[-2000:]

    app = run(
        "python", "-c", "from fedmoe_pl.flower.local import APP_DIR; print((APP_DIR / 'pyproject.toml').exists())"
    )
    assert app.stdout.strip() == "True", app.stderr[-2000:]
    if sys.version_info >= (3, 11):  # Flower needs 3.11+
        refused = run("python", "-m", "fedmoe_pl.flower.local", "--config", str(config), "--federation.run_dir", "run")
        assert refused.returncode == 2 and "already holds a run" in refused.stderr, refused.stderr[-2000:]
