"""The grid as a job array on a real one-node Slurm cluster (started by the ``slurm_cluster`` fixture)."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import assert_same_run, tiny_config

from fedmoe_pl.cli import main
from fedmoe_pl.cluster.grid import Grid

pytestmark = pytest.mark.slow


def _submit(grid_file: Path, capsys) -> str:
    main(["grid", str(grid_file), "--launcher", "slurm", "--time", "10"])
    out = capsys.readouterr().out
    found = re.search(r"submitted job array (\d+)", out)
    assert found, out
    return found.group(1)


def _wait_gone(job: str, env: dict[str, str], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True).stdout
        if not listed.strip():
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job} still queued after {timeout} s")


def _grid(tmp_path: Path, seeds: list[int], rounds: int) -> Path:
    tiny_config(tmp_path)
    path = tmp_path / "grid.yaml"
    body = {
        "name": "t",
        "base": "tiny.yaml",
        "axes": {},
        "seeds": seeds,
        "args": ["--federation.rounds", str(rounds)],
        "output": str(tmp_path / "out"),
    }
    path.write_text(yaml.safe_dump(body))
    return path


def test_slurm_array_of_two_cells_completes(tmp_path: Path, slurm_cluster, monkeypatch, capsys) -> None:
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    grid_file = _grid(tmp_path, seeds=[1, 2], rounds=2)
    job = _submit(grid_file, capsys)
    main(["grid", str(grid_file), "--launcher", "slurm"])  # at once: both cells are still queued or running
    assert "(2 queued or running); nothing to submit" in capsys.readouterr().out
    _wait_gone(job, slurm_cluster)
    cells = Grid.load(grid_file).cells()
    logs = sorted((tmp_path / "out" / ".slurm").glob(f"*/{job}_*.out"))
    assert [c.status() for c in cells] == ["finished", "finished"], [p.read_text()[-2000:] for p in logs]
    assert len(logs) == 2
    for cell in cells:
        summary = json.loads((Path(cell.run_dir) / "summary.json").read_text())
        assert (summary["status"], summary["rounds"]) == ("completed", 2)
    assert not list((tmp_path / "out").rglob("hpc_ckpt*"))  # Lightning's own requeue stayed off
    # Submitting again finds nothing left to do.
    main(["grid", str(grid_file), "--launcher", "slurm"])
    assert "all 2 cells are finished or queued (0 queued or running)" in capsys.readouterr().out


def test_slurm_task_signalled_with_usr1_requeues_and_ends_as_an_uninterrupted_run(
    tmp_path: Path, slurm_cluster, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("SLURM_CONF", slurm_cluster["SLURM_CONF"])
    rounds = 40
    grid_file = _grid(tmp_path, seeds=[3], rounds=rounds)
    (cell,) = Grid.load(grid_file).cells()
    job = _submit(grid_file, capsys)
    metrics = Path(cell.run_dir) / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline, "the task never reached round 3"
        time.sleep(0.05)
    # Plain `scancel --signal` reaches the task's srun step, as the time-limit signal does.
    subprocess.run(["scancel", "--signal=USR1", f"{job}_0"], env=slurm_cluster, check=True)
    _wait_gone(job, slurm_cluster)

    (log,) = (tmp_path / "out" / ".slurm").glob(f"*/{job}_0.out")
    text = log.read_text()
    assert cell.status() == "finished", text[-3000:]
    assert "interrupted by SIGUSR1" in text and "requeueing Slurm job" in text
    assert "restart 1," in text  # the requeued run of the same task
    shown = subprocess.run(["scontrol", "show", "job", f"{job}_0"], env=slurm_cluster, capture_output=True, text=True)
    assert "Restarts=1" in shown.stdout
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    assert not list((tmp_path / "out").rglob("hpc_ckpt*"))

    reference = tmp_path / "reference"
    configs = [a for c in cell.configs for a in ("--config", c)]
    main(["fit", *configs, "--seed_everything=3", f"--federation.rounds={rounds}", f"--federation.run_dir={reference}"])
    assert_same_run(Path(cell.run_dir), reference)
