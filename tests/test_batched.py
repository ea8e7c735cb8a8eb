"""The batched executor trains a round's clients together and ends where the sequential one does."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import overlay, tiny_config

from fedmoe_pl.cli import _experiment, build_parser, main, subcommand_parser
from fedmoe_pl.fleets.batched import BatchedExecutor
from fedmoe_pl.fleets.executor import SequentialExecutor
from fedmoe_pl.run.experiment import build_federation
from fedmoe_pl.run.federation import Federation

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


def _jobs(fed: Federation) -> list:
    """Every client's local fit in round 1."""
    return fed.fleet.jobs(fed.cohort(1, range(fed.fleet.num_clients)))  # type: ignore[attr-defined]


@pytest.mark.parametrize("batched_group", [6, 1], ids=["stacked", "one-at-a-time"])
@pytest.mark.parametrize("method", list(METHODS))
def test_batched_executor_round_gives_the_sequential_parameters(tmp_path: Path, method: str, batched_group) -> None:
    """``batched_group=6`` stacks every client of an architecture (3 here), as a GPU does by default."""
    fed = _federation(tmp_path, method)
    jobs = _jobs(fed)
    sizes = {job.data.num_train for job in jobs}
    assert len(sizes) > 2  # uneven shards: the buckets are exercised
    start = [copy.deepcopy(c.state_dict()) for c in fed.fleet.pool]
    sequential = list(SequentialExecutor({"accelerator": "cpu"}).fit(jobs))
    expected = [copy.deepcopy(c.state_dict()) for c in fed.fleet.pool]
    for client, state in zip(fed.fleet.pool, start):
        client.load_state_dict(state)
    batched = list(BatchedExecutor("cpu", batched_group=batched_group).fit(jobs))
    for k, client in enumerate(fed.fleet.pool):
        assert batched[k].error is None and batched[k].result is not None
        got = client.state_dict()
        for name, value in expected[k].items():
            moved = (value.float() - start[k][name].float()).abs().max()
            assert moved > 0 or "running" in name or value.dtype == torch.long  # training changed it
            if batched_group == 1:  # the sequential step op for op: equal to the bit
                assert torch.equal(got[name], value), f"client {k} {name}"
            else:  # stacked under vmap: float rounding only
                torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=f"client {k} {name}")
        seq_result = sequential[k].result
        assert seq_result is not None
        assert batched[k].result.num_samples == seq_result.num_samples
        loss = seq_result.metrics["train_loss"]
        if batched_group == 1:
            assert batched[k].result.metrics["train_loss"] == loss
        else:
            assert batched[k].result.metrics["train_loss"] == pytest.approx(loss, rel=1e-5)
        for name, value in seq_result.upload.items():
            torch.testing.assert_close(batched[k].result.upload[name], value, rtol=1e-5, atol=1e-6)


def test_pfedmoe_clients_of_every_architecture_form_one_group_and_other_methods_one_per_architecture(
    tmp_path: Path,
) -> None:
    """pFedMoE's gate and global expert have the same shapes in every client: one stack for the whole
    round, local experts and heads stacked per architecture (the equivalence tests above run it)."""
    from fedmoe_pl.fleets.batched import _Common, _Loss, architecture_key

    executor = BatchedExecutor("cpu", batched_group=6)
    for method, expected in (("pfedmoe", [[0, 1, 2, 3, 4, 5]]), ("standalone", [[0, 2, 4], [1, 3, 5]])):
        (tmp_path / method).mkdir()
        fed = _federation(tmp_path / method, method)
        jobs = _jobs(fed)
        assert len({architecture_key(c) for c in fed.fleet.pool}) == 2
        assert executor.groups(jobs) == (expected, [])
        apart = BatchedExecutor("cpu", batched_group=6, across_architectures=False)
        assert apart.groups(jobs) == ([[0, 2, 4], [1, 3, 5]], [])
        if method == "pfedmoe":
            plan = executor._plan(list(fed.fleet.pool)[:4])
            assert isinstance(plan.shell, _Common) and [s.members for s, _ in plan.own] == [[0, 2], [1, 3]]
            assert all(
                name.startswith(("client.moe.gate.", "client.moe.global_expert.")) for name in plan.common.params
            )
            assert all(".local_expert." in n or ".head." in n for s, _ in plan.own for n in s.params)
        else:
            plan = executor._plan([fed.fleet.pool[0], fed.fleet.pool[2]])
            assert isinstance(plan.shell, _Loss) and not plan.own
    assert BatchedExecutor("cpu", batched_group=4).groups(jobs)[0] == [[0, 2, 4], [1, 3, 5]]
    assert BatchedExecutor("cpu", batched_group=2).groups(jobs)[0] == [[0, 2], [4], [1, 3], [5]]


def test_batched_executor_trains_clients_that_are_not_batchable_one_by_one(tmp_path: Path) -> None:
    fed = _federation(tmp_path, "standalone", "--algorithm", "fedmoe_pl.algorithms.FedProto")
    jobs = _jobs(fed)
    start = [copy.deepcopy(c.state_dict()) for c in fed.fleet.pool]
    sequential = [o.result for o in SequentialExecutor({"accelerator": "cpu"}).fit(jobs)]
    expected = [copy.deepcopy(c.state_dict()) for c in fed.fleet.pool]
    for client, state in zip(fed.fleet.pool, start):
        client.load_state_dict(state)
    batched = [o.result for o in BatchedExecutor("cpu").fit(jobs)]
    assert not fed.fleet.pool[0].batchable
    for k, client in enumerate(fed.fleet.pool):
        assert all(torch.equal(client.state_dict()[n], v) for n, v in expected[k].items())
        assert batched[k] is not None and sequential[k] is not None
        assert all(torch.equal(batched[k].upload[n], v) for n, v in sequential[k].upload.items())


def _accuracies(run: Path) -> list[float]:
    return [json.loads(line)["mean_acc"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_batched_executor_run_agrees_with_the_sequential_run_round_by_round(tmp_path: Path) -> None:
    """One client at a time the batched path is the sequential step op for op: the same accuracies
    to the bit. Stacked (three clients of an architecture per step) only float rounding differs:
    within 0.5 points per round, as the README states."""
    config = tiny_config(tmp_path, rounds=6)
    zoo = overlay(tmp_path, "zoo", {"client": {"zoo": ["cnn3", "cnn5"]}, "data": {"num_clients": 6}})
    argv = ["fit", "--config", str(config), "--config", str(zoo)]
    main([*argv, "--federation.run_dir", str(tmp_path / "sequential")])
    batched = ["--federation.executor", "batched", "--federation.batched_group"]
    main([*argv, "--federation.run_dir", str(tmp_path / "one"), *batched, "1"])
    main([*argv, "--federation.run_dir", str(tmp_path / "stacked"), *batched, "3"])
    sequential, one, stacked = (_accuracies(tmp_path / name) for name in ("sequential", "one", "stacked"))
    assert len(sequential) == len(stacked) == 6
    assert one == sequential
    assert all(abs(a - b) <= 0.005 for a, b in zip(sequential, stacked)), (sequential, stacked)


def test_an_unknown_executor_is_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(tiny_config(tmp_path)), "--federation.executor", "parallel"])
    assert stop.value.code == 2
    assert "parallel" in capsys.readouterr().err


QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


@pytest.mark.slow
def test_batched_executor_quickstart_rounds_agree_with_the_sequential_executor(tmp_path: Path) -> None:
    """The real quickstart (Fashion-MNIST from Debian's dataset-fashion-mnist), clients stacked by architecture.
    Three rounds (a quickstart round is about half a minute here); the README's ten were measured once."""
    from fedmoe_pl.data.sources import DEBIAN_FASHION_MNIST

    if not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST is not in {DEBIAN_FASHION_MNIST}: apt-get install dataset-fashion-mnist")
    argv = ["fit", "--config", str(QUICKSTART), "--federation.rounds", "3", "--trainer.accelerator", "cpu"]
    argv += ["--data.source.init_args.root", str(tmp_path / "data")]
    main([*argv, "--federation.run_dir", str(tmp_path / "sequential")])
    stacked = ["--federation.executor", "batched", "--federation.batched_group", "10"]
    main([*argv, "--federation.run_dir", str(tmp_path / "batched"), *stacked])
    sequential, batched = _accuracies(tmp_path / "sequential"), _accuracies(tmp_path / "batched")
    assert len(sequential) == len(batched) == 3
    assert all(abs(a - b) <= 0.0003 for a, b in zip(sequential, batched)), (sequential, batched)  # README: 0.03 points
    assert sequential[-1] > 0.9  # it learned: the comparison is between trained models


STEP_RULES = {
    "clip-norm": {"gradient_clip_val": 0.05},
    "clip-value": {"gradient_clip_val": 0.002, "gradient_clip_algorithm": "value"},
    "accumulate": {"accumulate_grad_batches": 3},
    "both": {"gradient_clip_val": 0.05, "accumulate_grad_batches": 2},
}


def _round(fed: Federation, executor) -> tuple[list[dict[str, torch.Tensor]], list]:
    jobs = _jobs(fed)
    start = [copy.deepcopy(c.state_dict()) for c in fed.fleet.pool]
    outcomes = list(executor.fit(jobs))
    after = [copy.deepcopy(c.state_dict()) for c in fed.fleet.pool]
    for client, state in zip(fed.fleet.pool, start):
        client.load_state_dict(state)
    return after, outcomes


@pytest.mark.parametrize("rules", list(STEP_RULES))
def test_clipping_and_accumulation_agree_between_the_executors_tensor_for_tensor(tmp_path: Path, rules: str) -> None:
    """The one-client batched path is the sequential step op for op: equal to the bit. Stacked
    clients (vmap) differ by float rounding only."""
    settings = {"accelerator": "cpu", **STEP_RULES[rules]}
    fed = _federation(tmp_path, "pfedmoe")
    plain, _ = _round(fed, SequentialExecutor({"accelerator": "cpu"}))
    sequential, seq_out = _round(fed, SequentialExecutor(settings))
    one, one_out = _round(fed, BatchedExecutor("cpu", trainer=settings, batched_group=1))
    stacked, stacked_out = _round(fed, BatchedExecutor("cpu", trainer=settings, batched_group=6))
    for k in range(len(fed.fleet.pool)):
        assert seq_out[k].error is None and one_out[k].error is None and stacked_out[k].error is None
        assert any(not torch.equal(sequential[k][n], v) for n, v in plain[k].items()), "the rule changed nothing"
        for name, value in sequential[k].items():
            assert torch.equal(one[k][name], value), f"client {k} {name}"
            torch.testing.assert_close(stacked[k][name], value, rtol=1e-5, atol=1e-6, msg=f"client {k} {name}")
        assert one_out[k].result.metrics["train_loss"] == seq_out[k].result.metrics["train_loss"]


def test_clipping_and_accumulation_match_a_plain_pytorch_loop(tmp_path: Path) -> None:
    """An independent loop: torch.optim.SGD, backward of loss / k, clip_grad_norm_ before each step."""
    from fedmoe_pl.fleets.batched import epoch_batches

    k, clip = 3, 0.05
    fed = _federation(tmp_path, "pfedmoe")
    job = _jobs(fed)[0]
    model = copy.deepcopy(job.client)
    batches = epoch_batches(job, torch.device("cpu"))
    per_epoch = len(batches) // job.epochs
    cfg = model.config
    sgd = torch.optim.SGD(model.param_groups(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    params = [p for group in model.param_groups() for p in group["params"]]
    model.train()
    for t, (x, y) in enumerate(batches):
        if t % per_epoch % k == 0:
            sgd.zero_grad()
        (model.training_loss(x, y) / k).backward()
        if (t % per_epoch + 1) % k == 0 or t % per_epoch + 1 == per_epoch:
            torch.nn.utils.clip_grad_norm_(params, clip)
            sgd.step()
    settings = {"accelerator": "cpu", "gradient_clip_val": clip, "accumulate_grad_batches": k}
    outcome = next(SequentialExecutor(settings).fit([job]))
    assert outcome.error is None
    for name, value in model.state_dict().items():
        torch.testing.assert_close(job.client.state_dict()[name], value, rtol=0, atol=1e-7, msg=name)


@pytest.mark.parametrize("setting", ["--trainer.precision=16-mixed", "--trainer.limit_train_batches=2"])
def test_the_batched_executor_refuses_a_setting_it_does_not_honour_before_writing(tmp_path: Path, capsys, setting):
    argv = ["fit", "--config", str(tiny_config(tmp_path)), "--federation.executor", "batched", setting]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert setting.removeprefix("--") in err and "sequential" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


class _NoisyCNN(torch.nn.Module):
    """A zoo model a user might bring: dropout in its head, a non-persistent buffer, an optional failure."""

    fail_on_client: int | None = None

    def __init__(self, in_channels: int, image_size: int, num_classes: int, dropout: float = 0.2) -> None:
        from fedmoe_pl.models import build_model

        super().__init__()
        inner = build_model("cnn5", in_channels, image_size, num_classes)
        self.extractor, self.inner_head = inner.extractor, inner.head
        self.head = torch.nn.Sequential(torch.nn.Dropout(dropout) if dropout else torch.nn.Identity(), self.inner_head)
        self.unused = torch.nn.Parameter(torch.ones(3))  # never in the loss: SGD leaves it alone
        self.register_buffer("scale", torch.ones(()), persistent=False)

    @property
    def feature_dim(self) -> int:
        return self.inner_head.in_features

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x) * self.scale

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _noisy_federation(tmp_path: Path, dropout: float) -> Federation:
    from fedmoe_pl.algorithms import ClientConfig, ClientContext

    fed = _federation(tmp_path, "standalone")
    model = {"class_path": "test_batched._NoisyCNN", "init_args": {"dropout": dropout}}
    cfg = ClientConfig(zoo=[model])
    fed.fleet.pool.clients = {  # type: ignore[attr-defined]
        cid: fed.algorithm.build_client(ClientContext(cid, model, 1, 16, 6, cfg)) for cid in range(len(fed.fleet.pool))
    }
    return fed


def test_stacked_clients_leave_a_parameter_without_gradient_alone_and_keep_non_persistent_buffers(
    tmp_path: Path,
) -> None:
    fed = _noisy_federation(tmp_path, dropout=0.0)
    sequential, _ = _round(fed, SequentialExecutor({"accelerator": "cpu"}))
    stacked, outcomes = _round(fed, BatchedExecutor("cpu", batched_group=6))
    for k, outcome in enumerate(outcomes):
        assert outcome.error is None, outcome.error
        assert torch.equal(stacked[k]["model.unused"], torch.ones(3))  # weight decay did not touch it
        for name, value in sequential[k].items():
            torch.testing.assert_close(stacked[k][name], value, rtol=1e-5, atol=1e-6, msg=f"client {k} {name}")


def test_a_stacked_group_that_cannot_vmap_trains_one_at_a_time_and_a_failure_stays_with_its_client(
    tmp_path: Path, caplog
) -> None:
    fed = _noisy_federation(tmp_path, dropout=0.2)
    broken = fed.fleet.pool.clients[1]
    broken.training_loss = lambda x, y: (_ for _ in ()).throw(RuntimeError("client 1 is broken"))  # type: ignore[method-assign]
    outcomes = list(BatchedExecutor("cpu", batched_group=6).fit(_jobs(fed)))
    assert "train one at a time" in caplog.text
    assert isinstance(outcomes[1].error, RuntimeError) and "client 1 is broken" in str(outcomes[1].error)
    for k, outcome in enumerate(outcomes):
        if k != 1:
            assert outcome.error is None and outcome.result is not None, outcome.error
            assert torch.equal(fed.fleet.pool.clients[k].model.unused, torch.ones(3))


def test_auto_means_batched_on_a_gpu_when_the_settings_allow_it_and_sequential_otherwise() -> None:
    from fedmoe_pl.run.experiment import uses_batched

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert uses_batched("auto", cuda, {}) and uses_batched("auto", cuda, {"precision": "bf16-mixed"})
    assert not uses_batched("auto", cuda, {"precision": "16-mixed"})  # the sequential executor honours it
    assert not uses_batched("auto", cpu, {}) and not uses_batched("sequential", cuda, {})
    assert uses_batched("batched", cpu, {})


def test_auto_on_the_cpu_trains_with_the_sequential_executor(tmp_path: Path) -> None:
    fed = _federation(tmp_path, "standalone", "--federation.executor", "auto")
    assert isinstance(fed.fleet.executor, SequentialExecutor)
