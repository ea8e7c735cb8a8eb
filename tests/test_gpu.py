"""The GPU path (``pytest -m gpu``): skipped without CUDA; ``FEDMOE_GPU_TEST_DEVICE=cpu`` runs the same
tests on the CPU, as ``benchmarks/gpu_check.py --dry-run`` does, so that they cannot fail for a typo
when a GPU comes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, overlay, tiny_config

from fedmoe_pl.cli import main

DEVICE = os.environ.get("FEDMOE_GPU_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else None)
ACCELERATOR = "gpu" if DEVICE == "cuda" else "cpu"
ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 28 if DEVICE == "cuda" else 16  # the quickstart's images on a GPU; smaller for a CPU dry run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE is None, reason="needs CUDA (FEDMOE_GPU_TEST_DEVICE=cpu runs these on the CPU)"),
]

METHODS = {
    "pfedmoe": {"class_path": "fedmoe_pl.algorithms.PFedMoE", "init_args": {"gate_hidden": 16}},
    "standalone": {"class_path": "fedmoe_pl.algorithms.Standalone"},
    "fedavg": {"class_path": "fedmoe_pl.algorithms.FedAvg"},
    "lg_fedavg": {"class_path": "fedmoe_pl.algorithms.LGFedAvg"},
}


def _config(tmp_path: Path, method: str = "pfedmoe", **federation) -> list[str]:
    zoo = ["cnn1"] if method == "fedavg" else ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"]  # the quickstart's zoo
    values = {
        "client": {"zoo": zoo},
        "algorithm": METHODS[method],
        "data": {"num_clients": 6, "source": {"init_args": {"image_size": IMAGE_SIZE}}},
        "trainer": {"accelerator": ACCELERATOR},
    }
    return ["--config", str(tiny_config(tmp_path, **federation)), "--config", str(overlay(tmp_path, method, values))]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("executor", ["sequential", "batched"])
@pytest.mark.parametrize("method", list(METHODS))
def test_the_quickstart_zoo_trains_on_the_device(tmp_path: Path, method: str, executor: str) -> None:
    main(["fit", *_config(tmp_path, method), "--federation.executor", executor])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["total_failed"] == 0
    assert summary["total_reported"] == 12 and summary["final_mean_acc"] is not None  # 6 clients, 2 rounds


def test_stacked_batched_rounds_agree_with_sequential_ones_within_half_a_point(tmp_path: Path) -> None:
    argv = ["fit", *_config(tmp_path, rounds=3)]
    main([*argv, "--federation.run_dir", str(tmp_path / "sequential")])
    main([*argv, "--federation.run_dir", str(tmp_path / "batched"), "--federation.executor", "batched",
          "--federation.batched_group", "6"])  # fmt: skip
    sequential, batched = _metrics(tmp_path / "sequential"), _metrics(tmp_path / "batched")
    assert len(sequential) == len(batched) == 3
    assert all(abs(a["mean_acc"] - b["mean_acc"]) <= 0.005 for a, b in zip(sequential, batched))


@pytest.mark.parametrize("executor", ["sequential", "batched"])
def test_bf16_mixed_runs(tmp_path: Path, executor: str) -> None:
    main(["fit", *_config(tmp_path), "--trainer.precision", "bf16-mixed", "--federation.executor", executor])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


def test_a_run_checkpointed_on_the_device_resumes_on_the_cpu(tmp_path: Path) -> None:
    argv = ["fit", *_config(tmp_path, rounds=1)]
    main(argv)
    main([*argv, "--federation.rounds", "2", "--resume", str(tmp_path / "run"), "--trainer.accelerator", "cpu"])
    assert [m["round"] for m in _metrics(tmp_path / "run")] == [1, 2]


def test_two_ranks_give_the_one_process_run(tmp_path: Path) -> None:
    if DEVICE == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("NCCL refuses two ranks on one GPU; this needs two")
    argv = [*_config(tmp_path, rounds=2)]
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    single = [sys.executable, "-m", "fedmoe_pl.cli", "fit", *argv, "--federation.run_dir", str(tmp_path / "one")]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                "--master-port", str(free_port()), "-m", "fedmoe_pl.cli", "fit", *argv,
                "--federation.run_dir", str(tmp_path / "two")]  # fmt: skip
    for command in (single, torchrun):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["per_client"]["client_acc"] for m in one] == [m["per_client"]["client_acc"] for m in two]


def test_a_stacked_step_and_its_batches_never_wait_for_the_device(tmp_path: Path, monkeypatch) -> None:
    """No host synchronisation inside an epoch: CUDA's sync debug mode turns any into an error while
    batches are made and stacked steps run (the split pFedMoE group, clipping and accumulation included)."""
    from fedmoe_pl.fleets import batched

    cuda = DEVICE == "cuda"  # on the CPU (the dry run) the same run, without CUDA's sync check
    step, batches = batched.BatchedExecutor._step, batched.JobBatches.__iter__
    checked: dict = {"steps": 0, "batches": 0, "errors": []}  # a failed stacked step would fall back quietly

    def sync_check(mode: str) -> None:
        if cuda:
            torch.cuda.set_sync_debug_mode(mode)

    def strict_step(*args, **kwargs):
        sync_check("error")
        try:
            return step(*args, **kwargs)
        except Exception as err:
            checked["errors"].append(repr(err))
            raise
        finally:
            sync_check("default")
            checked["steps"] += 1

    def strict_batches(self):
        made = batches(self)
        while True:
            sync_check("error")
            try:
                batch = next(made)
            except StopIteration:
                return
            except Exception as err:
                checked["errors"].append(repr(err))
                raise
            finally:
                sync_check("default")
            checked["batches"] += 1
            yield batch

    monkeypatch.setattr(batched.BatchedExecutor, "_step", strict_step)
    monkeypatch.setattr(batched.JobBatches, "__iter__", strict_batches)
    augmented = overlay(tmp_path, "augment", {"data": {"augment": True}})
    main(["fit", *_config(tmp_path, rounds=1), "--config", str(augmented), "--federation.executor", "batched",
          "--federation.batched_group", "6", "--trainer.gradient_clip_val", "0.5",
          "--trainer.accumulate_grad_batches", "2"])  # fmt: skip
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["total_failed"] == 0, summary
    assert checked["steps"] > 0 and checked["batches"] > 0 and not checked["errors"], checked["errors"]


@pytest.mark.parametrize("executor", ["sequential", "batched"])
@pytest.mark.parametrize("kind", ["tabular", "text"])
def test_rows_and_texts_train_on_the_device(tmp_path: Path, kind: str, executor: str) -> None:
    """The hospitals' rows (standardized on the device) and AG News texts (the gate's token bag on the
    device), two rounds of pFedMoE, in files of the real formats."""
    from test_tabular import write_hospitals
    from test_text import write_ag_news

    if kind == "tabular":
        write_hospitals(tmp_path / "data" / "heart-disease")
        args = ["--config", str(ROOT / "configs" / "heart_disease.yaml")]
    else:
        write_ag_news(tmp_path / "data" / "ag_news_csv")
        args = ["--config", str(ROOT / "configs" / "agnews.yaml"), "--data.num_clients", "4"]
        args += ["--federation.participation", "1.0"]
    args += ["--data.source.init_args.root", str(tmp_path / "data"), "--federation.rounds", "2"]
    args += ["--federation.run_dir", str(tmp_path / "run"), "--trainer.accelerator", ACCELERATOR]
    main(["fit", *args, "--federation.executor", executor])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["total_reported"] == 8 and summary["total_failed"] == 0
    assert 0.0 <= summary["final_mean_acc"] <= 1.0
