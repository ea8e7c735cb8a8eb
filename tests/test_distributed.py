"""One run in two processes (torchrun, srun -n 2): the same rounds, metrics and clients as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import assert_same_run, free_port, overlay, tiny_config

from fedmoe_pl.fleets.distributed import ProcessGroup, assign

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for key in [k for k in env if k.startswith("SLURM_")]:  # a test run inside a Slurm job is no launcher
        if key != "SLURM_CONF":
            del env[key]
    return env


def _single(*argv: str) -> list[str]:
    return [sys.executable, "-m", "fedmoe_pl.cli", "fit", *argv]


def _torchrun(*argv: str) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    return [*launcher, "--master-port", str(free_port()), "-m", "fedmoe_pl.cli", "fit", *argv]


def _run(command: list[str], timeout: float = 300) -> None:
    done = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_distributed_split_is_balanced_by_training_samples_and_the_same_everywhere() -> None:
    sizes = [600, 100, 500, 300, 300, 200]
    shares = assign(sizes, 2)
    assert sorted(i for share in shares for i in share) == list(range(6))
    loads = [sum(sizes[i] for i in share) for share in shares]
    assert loads == [1000, 1000]
    assert assign(sizes, 2) == shares and assign([5], 3) == [[0], [], []]


def test_distributed_process_group_comes_from_the_launcher() -> None:
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert ProcessGroup.from_env(torchrun) == ProcessGroup(1, 2, 1)
    srun = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1"}
    assert ProcessGroup.from_env(srun) == ProcessGroup(1, 2, 1)
    # One task (a grid cell's step), a batch script outside any step, or a plain process: no group.
    assert ProcessGroup.from_env({**srun, "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert ProcessGroup.from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "4294967291"}) is None
    assert ProcessGroup.from_env({}) is None


@pytest.mark.parametrize(
    ("store", "executor"), [("memory", "sequential"), ("disk", "sequential"), ("memory", "batched")]
)
def test_distributed_two_gloo_processes_give_the_single_process_run(tmp_path: Path, store: str, executor: str) -> None:
    config = tiny_config(tmp_path, rounds=3, participation=0.7, client_store=store, executor=executor)
    argv = ["--config", str(config)]
    if executor == "batched":  # two architectures, three clients each, stacked by architecture on each rank
        zoo = {"client": {"zoo": ["cnn3", "cnn5"]}, "data": {"num_clients": 6}, "federation": {"batched_group": 6}}
        argv += ["--config", str(overlay(tmp_path, "stacked", zoo))]
    _run(_single(*argv, "--federation.run_dir", str(tmp_path / "single")))
    _run(_torchrun(*argv, "--federation.run_dir", str(tmp_path / "multi")))
    if executor == "batched":
        # The ranks stack other subsets of a round's clients than one process does: float rounding only.
        single, multi = _metrics(tmp_path / "single"), _metrics(tmp_path / "multi")
        assert [m["round"] for m in single] == [m["round"] for m in multi] == [1, 2, 3]
        assert all(abs(a["mean_acc"] - b["mean_acc"]) <= 0.005 for a, b in zip(single, multi))
        assert all(a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4) for a, b in zip(single, multi))
    else:
        assert_same_run(tmp_path / "single", tmp_path / "multi")
    for record in _metrics(tmp_path / "multi"):  # both ranks trained a share of every round
        assert len(record["rank_train_samples"]) == 2 and min(record["rank_train_samples"]) > 0
    summary = json.loads((tmp_path / "multi" / "summary.json").read_text())
    assert summary["status"] == "completed"


def _worker_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of torchrun's workers."""
    children = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout.split()
    ranks = {}
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        rank = next((v.split(b"=", 1)[1] for v in environ if v.startswith(b"RANK=")), None)
        if rank is not None:
            ranks[int(rank)] = int(pid)
    return ranks


@pytest.mark.slow
@pytest.mark.parametrize("store", ["memory", "disk"])
def test_distributed_run_with_one_rank_killed_resumes_to_the_single_process_result(tmp_path: Path, store: str) -> None:
    slow = overlay(tmp_path, "slow", {"data": {"source": {"init_args": {"train_per_class": 300}}}})
    config = tiny_config(tmp_path, rounds=5, local_epochs=2, client_store=store)
    argv = ["--config", str(config), "--config", str(slow)]
    run = tmp_path / "multi"
    proc = subprocess.Popen(_torchrun(*argv, "--federation.run_dir", str(run)), env=_env(), stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while len(_metrics(run)) < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(_worker_pids(proc.pid)[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode != 0, err.decode()[-3000:]
    done = json.loads((run / "summary.json").read_text())["rounds"]
    assert 2 <= done < 5, "the kill landed after the run ended; make the rounds longer"

    _run(_torchrun(*argv, "--federation.run_dir", str(run), "--resume", str(run)))
    _run(_single(*argv, "--federation.run_dir", str(tmp_path / "single")))
    assert_same_run(tmp_path / "single", run)
    assert [m["round"] for m in _metrics(run)] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_distributed_slurm_srun_two_tasks_give_the_single_process_run(tmp_path: Path, slurm_cluster) -> None:
    config = tiny_config(tmp_path, rounds=3, participation=0.7)
    argv = ["--config", str(config)]
    _run(_single(*argv, "--federation.run_dir", str(tmp_path / "single")))
    env = _env(SLURM_CONF=slurm_cluster["SLURM_CONF"], MASTER_PORT=str(free_port()))
    srun = ["srun", "-n", "2", "--time", "10", "--chdir", str(tmp_path)]
    done = subprocess.run(
        [*srun, *_single(*argv, "--federation.run_dir", str(tmp_path / "multi"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("final mean client test accuracy") == 1  # rank 0 speaks for the run
    assert_same_run(tmp_path / "single", tmp_path / "multi")
    assert all(min(r["rank_train_samples"]) > 0 for r in _metrics(tmp_path / "multi"))


# Two ranks started by hand (no torchrun agent to kill the survivors); one of them fails in round 2.
_FAILING_RANK = """
import os, sys
from fedmoe_pl.fleets.in_process import InProcessFleet
if os.environ["RANK"] == os.environ["FAIL_RANK"]:
    end_round = InProcessFleet.end_round
    def fail_in_round_2(self, round_):
        if round_ == 2:
            raise RuntimeError("injected failure in round 2")
        return end_round(self, round_)
    InProcessFleet.end_round = fail_in_round_2
from fedmoe_pl.cli import main
main(sys.argv[1:])
"""


@pytest.mark.slow
@pytest.mark.parametrize("failing", [1, 0])
def test_a_failure_on_one_rank_stops_every_rank_within_seconds(tmp_path: Path, failing: int) -> None:
    config = tiny_config(tmp_path, rounds=6)
    run = tmp_path / "multi"
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = _env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        env["FAIL_RANK"] = str(failing)
        command = [
            sys.executable,
            "-c",
            _FAILING_RANK,
            "fit",
            "--config",
            str(config),
            "--federation.run_dir",
            str(run),
        ]
        procs.append(subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True))
    start = time.monotonic()
    errs = []
    try:
        for proc in procs:
            errs.append(proc.communicate(timeout=max(1.0, 120 - (time.monotonic() - start)))[1])
    finally:
        for proc in procs:
            proc.kill()
    elapsed = time.monotonic() - start
    assert elapsed < 60, f"the ranks took {elapsed:.0f} s to stop"
    assert all(proc.returncode not in (0, None) for proc in procs), [p.returncode for p in procs]
    said = f"fedmoe-pl fit: error: rank {failing} failed: RuntimeError: injected failure in round 2; every rank stops"
    assert said in errs[0], errs[0][-2000:]  # rank 0 speaks for the run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and "injected failure" in summary["reason"]
    assert summary["rounds"] >= 1
    assert not list(tmp_path.glob(".rendezvous-*"))


def test_a_rank_uses_the_gpu_its_binding_leaves_it(monkeypatch) -> None:
    import torch

    group = ProcessGroup(3, 4, 3)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # Slurm bound one GPU to the task
    assert group.cuda_index() == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)  # every GPU of the node visible
    assert group.cuda_index() == 3


def test_two_steps_of_one_job_get_different_rendezvous_ports(tmp_path: Path, monkeypatch) -> None:
    ports = set()
    for step in ("0", "1"):
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        monkeypatch.setenv("SLURM_STEP_ID", step)
        ports.add(ProcessGroup(0, 2, 0)._rendezvous_port(None))
        published = ProcessGroup(0, 2, 0)._rendezvous_port(tmp_path)
        assert ProcessGroup(1, 2, 1)._rendezvous_port(tmp_path) == published  # the follower reads rank 0's
        assert (tmp_path / f".rendezvous-4242.{step}").read_text() == str(published)
    assert len(ports) == 2
