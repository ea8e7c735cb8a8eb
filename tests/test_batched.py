"""The batched executor trains a round's clients together and ends where the sequential one does."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import overlay, tiny_config

from fedmoe_pl.batched import BatchedExecutor
from fedmoe_pl.cli import _experiment, build_parser, main, subcommand_parser
from fedmoe_pl.executor import SequentialExecutor
from fedmoe_pl.experiment import build_federation
from fedmoe_pl.federation import Federation

METHODS = {
    "pfedmoe": {"class_path": "fedmoe_pl.algorithms.PFedMoE", "init_args": {"gate_hidden": 16, "gate_lr": 0.02}},
    "standalone": {"class_path": "fedmoe_pl.algorithms.Standalone"},
    "lg_fedavg": {"class_path": "fedmoe_pl.algorithms.LGFedAvg"},
    "fedavg": {"class_path": "fedmoe_pl.algorithms.FedAvg"},
}


def _federation(tmp_path: Path, method: str, *argv: str) -> Federation:
    # 6 clients on two architectures (groups of 3), Dirichlet shards of uneven sizes whose last
    # batches differ, two local epochs.
    config = tiny_config(tmp_path, local_epochs=2)
    zoo = ["cnn3"] if method == "fedavg" else ["cnn3", "cnn5"]
    values = {
        "data": {
            "num_clients": 6,
            "partitioner": {"class_path": "fedmoe_pl.data.Dirichlet", "init_args": {"alpha": 0.5}},
            "source": {"init_args": {"train_per_class": 47}},
        },
        "client": {"zoo": zoo},
        "algorithm": METHODS[method],
    }
    parser = build_parser()
    cfg = parser.parse_args(["fit", "--config", str(config), "--config", str(overlay(tmp_path, method, values)), *argv])
    exp = _experiment(subcommand_parser(parser, "fit"), cfg["fit"])
    torch.manual_seed(0)
    exp.data.setup(exp.seed)
    return build_federation(exp)


@pytest.mark.parametrize("max_group", [6, 1], ids=["stacked", "one-at-a-time"])
@pytest.mark.parametrize("method", list(METHODS))
def test_batched_executor_round_gives_the_sequential_parameters(tmp_path: Path, method: str, max_group) -> None:
    """``max_group=6`` stacks every client of an architecture (3 here), as a GPU does by default."""
    fed = _federation(tmp_path, method)
    jobs = [fed._job(cid, 1) for cid in range(len(fed.clients))]
    sizes = {job.data.num_train for job in jobs}
    assert len(sizes) > 2  # uneven shards: the buckets are exercised
    start = [copy.deepcopy(c.state_dict()) for c in fed.clients]
    sequential = list(SequentialExecutor({"accelerator": "cpu"}).fit(jobs))
    expected = [copy.deepcopy(c.state_dict()) for c in fed.clients]
    for client, state in zip(fed.clients, start):
        client.load_state_dict(state)
    batched = list(BatchedExecutor("cpu", max_group=max_group).fit(jobs))
    for k, client in enumerate(fed.clients):
        assert batched[k].error is None and batched[k].result is not None
        got = client.state_dict()
        for name, value in expected[k].items():
            moved = (value.float() - start[k][name].float()).abs().max()
            assert moved > 0 or "running" in name or value.dtype == torch.long  # training changed it
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=f"client {k} {name}")
        seq_result = sequential[k].result
        assert seq_result is not None
        assert batched[k].result.num_samples == seq_result.num_samples
        assert batched[k].result.metrics["train_loss"] == pytest.approx(seq_result.metrics["train_loss"], rel=1e-5)
        for name, value in seq_result.upload.items():
            torch.testing.assert_close(batched[k].result.upload[name], value, rtol=1e-5, atol=1e-6)


def test_batched_executor_trains_clients_that_are_not_batchable_one_by_one(tmp_path: Path) -> None:
    fed = _federation(tmp_path, "standalone", "--algorithm", "fedmoe_pl.algorithms.FedProto")
    jobs = [fed._job(cid, 1) for cid in range(len(fed.clients))]
    start = [copy.deepcopy(c.state_dict()) for c in fed.clients]
    sequential = [o.result for o in SequentialExecutor({"accelerator": "cpu"}).fit(jobs)]
    expected = [copy.deepcopy(c.state_dict()) for c in fed.clients]
    for client, state in zip(fed.clients, start):
        client.load_state_dict(state)
    batched = [o.result for o in BatchedExecutor("cpu").fit(jobs)]
    assert not fed.clients[0].batchable
    for k, client in enumerate(fed.clients):
        assert all(torch.equal(client.state_dict()[n], v) for n, v in expected[k].items())
        assert batched[k] is not None and sequential[k] is not None
        assert all(torch.equal(batched[k].upload[n], v) for n, v in sequential[k].upload.items())


def _accuracies(run: Path) -> list[float]:
    return [json.loads(line)["mean_acc"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_batched_executor_run_agrees_with_the_sequential_run_round_by_round(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, rounds=6)
    zoo = overlay(tmp_path, "zoo", {"client": {"zoo": ["cnn3", "cnn5"]}, "data": {"num_clients": 6}})
    argv = ["fit", "--config", str(config), "--config", str(zoo)]
    main([*argv, "--federation.run_dir", str(tmp_path / "sequential")])
    main([*argv, "--federation.run_dir", str(tmp_path / "batched"), "--federation.executor", "batched"])
    sequential, batched = _accuracies(tmp_path / "sequential"), _accuracies(tmp_path / "batched")
    assert len(sequential) == len(batched) == 6
    assert all(abs(a - b) <= 0.01 for a, b in zip(sequential, batched)), (sequential, batched)


def test_an_unknown_executor_is_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(tiny_config(tmp_path)), "--federation.executor", "parallel"])
    assert stop.value.code == 2
    assert "parallel" in capsys.readouterr().err


QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@pytest.mark.slow
def test_batched_executor_quickstart_ten_rounds_agree_with_the_sequential_executor(tmp_path: Path) -> None:
    """The real quickstart (Fashion-MNIST from Debian's dataset-fashion-mnist), clients stacked by architecture."""
    from fedmoe_pl.data.sources import DEBIAN_FASHION_MNIST

    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST is not in {DEBIAN_FASHION_MNIST}: apt-get install dataset-fashion-mnist")
    argv = ["fit", "--config", str(QUICKSTART), "--federation.rounds", "10", "--trainer.accelerator", "cpu"]
    argv += ["--data.source.init_args.root", str(tmp_path / "data")]
    main([*argv, "--federation.run_dir", str(tmp_path / "sequential")])
    stacked = ["--federation.executor", "batched", "--federation.batched_group", "10"]
    main([*argv, "--federation.run_dir", str(tmp_path / "batched"), *stacked])
    sequential, batched = _accuracies(tmp_path / "sequential"), _accuracies(tmp_path / "batched")
    assert len(sequential) == len(batched) == 10
    assert all(abs(a - b) <= 0.01 for a, b in zip(sequential, batched)), (sequential, batched)
    assert sequential[-1] > 0.9  # it learned: the comparison is between trained models
