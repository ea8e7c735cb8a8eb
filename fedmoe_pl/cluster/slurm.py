"""A grid as one Slurm job array, and the task each array element runs.

``submit`` writes, under ``<output>/.slurm/<time>/``, the cells as ``cells.json`` and one sbatch
script, then submits it as a job array with one task per unfinished cell. Each task runs
``python -m fedmoe_pl.cluster.slurm cells.json $SLURM_ARRAY_TASK_ID`` as an ``srun`` step, so that both
the time-limit signal (``--signal=USR1@lead``) and ``scancel --signal=USR1`` reach the Python
process. On SIGUSR1 the run keeps its last complete round's checkpoint, the task requeues
itself (``scontrol requeue``) and the requeued task resumes from the run directory.

Lightning's own Slurm auto-requeue stays off inside the per-client Trainers (the executor gives
them ``SLURMEnvironment(auto_requeue=False)``): the federation, not one local fit, is what
must be saved and resumed.
"""

from __future__ import annotations

import getpass
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from fedmoe_pl.cluster.grid import Cell, Grid, SlurmOptions, write_cell_file

REQUEUE_EXIT = 128 + signal.SIGUSR1  # a run interrupted by SIGUSR1 exits with this code
TASK_FILE = "slurm-task.json"  # in a cell's run directory: the array task submitted for it


def array_spec(indices: list[int], throttle: int) -> str:
    """``--array`` value: the indices, compressed into ranges, with an optional ``%throttle``."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in runs]
    return ",".join(parts) + (f"%{throttle}" if throttle > 0 else "")


def sbatch_script(grid: Grid, opts: SlurmOptions, manifest: Path, indices: list[int], workdir: Path) -> str:
    """The batch script of the array: resources, requeue-on-signal, one srun step per task."""
    folder = manifest.parent.resolve()
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=fedmoe-{grid.name}",
        f"#SBATCH --array={array_spec(indices, opts.throttle)}",
        f"#SBATCH --output={folder}/%A_%a.out",
        "#SBATCH --open-mode=append",  # a requeued task appends instead of truncating the log
        "#SBATCH --requeue",
        f"#SBATCH --signal=USR1@{opts.signal_lead_s}",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={opts.cpus_per_task}",
    ]
    if opts.partition:
        lines.append(f"#SBATCH --partition={opts.partition}")
    if opts.time:
        lines.append(f"#SBATCH --time={opts.time}")
    if opts.gpus:
        lines.append(f"#SBATCH --gres=gpu:{opts.gpus}")
    if opts.mem:
        lines.append(f"#SBATCH --mem={opts.mem}")
    if opts.account:
        lines.append(f"#SBATCH --account={opts.account}")
    lines += [f"#SBATCH {option}" for option in opts.extra]
    task = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "fedmoe_pl.cluster.slurm", str(manifest.resolve())))
    lines += [
        "",
        f"cd {shlex.quote(str(workdir.resolve()))}",
        'echo "== task $SLURM_ARRAY_TASK_ID of job $SLURM_ARRAY_JOB_ID on $(hostname),'
        ' restart ${SLURM_RESTART_COUNT:-0}, $(date -Is)"',
        f"srun --ntasks=1 {task} $SLURM_ARRAY_TASK_ID",
        "",
    ]
    return "\n".join(lines)


def in_flight(cells: list[Cell]) -> set[int]:
    """Indices of cells whose task from an earlier submission is still queued or running."""
    tasks = {}
    for i, cell in enumerate(cells):
        record = Path(cell.run_dir) / TASK_FILE
        if record.is_file():
            tasks[json.loads(record.read_text())["task"]] = i
    if not tasks:
        return set()
    listed = subprocess.run(
        ["squeue", "-h", "--array", "--user", getpass.getuser(), "-o", "%i"], capture_output=True, text=True
    )
    if listed.returncode != 0:
        raise RuntimeError(f"squeue could not list your jobs: {listed.stderr.strip()}")
    return {tasks[task] for task in listed.stdout.split() if task in tasks}


def submit(grid: Grid, cells: list[Cell], opts: SlurmOptions, dry_run: bool = False) -> str | None:
    """Write the manifest and script; submit the unfinished cells as one array. Returns the job id.

    Cells that are finished, or whose task from an earlier submission is still queued or
    running, are left out.
    """
    unfinished = [i for i, cell in enumerate(cells) if cell.status() != "finished"]
    busy = in_flight(cells) if unfinished and not dry_run else set()
    todo = [i for i in unfinished if i not in busy]
    if not todo:
        print(f"all {len(cells)} cells are finished or queued ({len(busy)} queued or running); nothing to submit")
        return None
    folder = Path(grid.output) / ".slurm" / time.strftime("%Y%m%d-%H%M%S")
    manifest = folder / "cells.json"
    script = sbatch_script(grid, opts, manifest, todo, Path.cwd())
    if dry_run:
        print(f"would submit {len(todo)} of {len(cells)} cells as this job array:\n{script}")
        return None
    folder.mkdir(parents=True, exist_ok=True)
    manifest.write_text(json.dumps([asdict(c) for c in cells], indent=2) + "\n")
    (folder / "grid.sbatch").write_text(script)
    try:
        done = subprocess.run(
            ["sbatch", "--parsable", str(folder / "grid.sbatch")], capture_output=True, text=True, check=False
        )
    except FileNotFoundError as err:
        raise RuntimeError("sbatch is not on PATH; run the grid on a Slurm login node or use --launcher local") from err
    if done.returncode != 0:
        raise RuntimeError(f"sbatch refused the job array ({folder / 'grid.sbatch'}): {done.stderr.strip()}")
    job_id = done.stdout.strip().split(";")[0]
    for i in todo:  # so that submitting again while these run leaves them out
        write_cell_file(cells[i])
        (Path(cells[i].run_dir) / TASK_FILE).write_text(json.dumps({"task": f"{job_id}_{i}"}) + "\n")
    print(
        f"submitted job array {job_id}: {len(todo)} of {len(cells)} cells ({len(cells) - len(unfinished)} finished, "
        f"{len(busy)} queued or running). Logs: {folder}/{job_id}_<task>.out; watch with squeue -j {job_id}"
    )
    return job_id


def requeue_self() -> bool:
    """Requeue the current Slurm task (an array element or a plain job); whether it worked."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{task}" if array_job and task else os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    print(f"requeueing Slurm job {job}; the requeued task resumes from its run directory", flush=True)
    try:
        return subprocess.run(["scontrol", "requeue", job], check=False).returncode == 0
    except FileNotFoundError:
        return False


def run_task(manifest: Path, index: int) -> int:
    """Run (or resume) cell ``index`` of ``manifest`` in this process; requeue on SIGUSR1."""
    from fedmoe_pl.cli import main

    cells = [Cell(**c) for c in json.loads(manifest.read_text())]
    cell = cells[index]
    if cell.status() == "finished":
        print(f"cell {cell.name} is finished already")
        return 0
    write_cell_file(cell)
    argv = ["fit", *cell.fit_args()]
    print(f"cell {cell.name}: fedmoe-pl {' '.join(argv)}", flush=True)
    try:
        main(argv)
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    if code == REQUEUE_EXIT and requeue_self():
        return 0
    return code


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m fedmoe_pl.cluster.slurm CELLS_JSON INDEX (run by the grid's sbatch script)")
    raise SystemExit(run_task(Path(sys.argv[1]), int(sys.argv[2])))
