"""FedPer and FedRep: a shared body and a private head; FedRep fits the head first, then the body."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import overlay, tiny_config

from fedmoe_pl.algorithms import ClientConfig, ClientContext, FedPer, FedRep
from fedmoe_pl.cli import main
from fedmoe_pl.data import IID, FederatedDataModule, Synthetic
from fedmoe_pl.fleets.executor import FitJob, SequentialExecutor
from fedmoe_pl.fleets.in_process import InProcessFleet
from fedmoe_pl.run.federation import Federation, FederationConfig


def data() -> FederatedDataModule:
    module = FederatedDataModule(Synthetic(num_classes=3, train_per_class=60, image_size=16), IID(), 3, batch_size=16)
    module.setup(0)
    return module


def body_bytes(client) -> int:
    return sum(t.numel() * t.element_size() for t in client.model.extractor.state_dict().values())


@pytest.mark.parametrize("method", [FedPer(), FedRep(body_epochs=1)], ids=["fedper", "fedrep"])
def test_two_rounds_send_the_body_only_with_exact_byte_counts(method) -> None:
    shards = data()
    fleet = InProcessFleet(shards, ClientConfig(zoo=["cnn1"], lr=0.02), method, 0)
    fed = Federation(FederationConfig(rounds=2, local_epochs=2), method, fleet, seed=0)
    heads = [{k: v.clone() for k, v in c.model.head.state_dict().items()} for c in fleet.pool]
    fed.run()
    body = body_bytes(fleet.pool[0])
    assert set(fleet.pool[0].upload()) == set(fleet.pool[0].model.extractor.state_dict())
    # Up: 3 clients x 2 rounds. Down: the initial body to all 3, then the average to the 3 that
    # reported, after each of the 2 rounds.
    assert fed.totals["bytes_up"] == 6 * body
    assert fed.totals["bytes_down"] == 9 * body
    bodies = [c.model.extractor.state_dict() for c in fleet.pool]
    for key, value in bodies[0].items():  # every client holds the last average
        assert all(torch.equal(value, other[key]) for other in bodies[1:])
    for client, before in zip(fleet.pool, heads):  # heads trained, privately
        assert any(not torch.equal(before[k], v) for k, v in client.model.head.state_dict().items())
    assert not torch.equal(fleet.pool[0].model.head.weight, fleet.pool[1].model.head.weight)


def test_fedrep_trains_the_head_alone_then_the_body_alone() -> None:
    shards = data()
    client = FedRep(body_epochs=1).build_client(ClientContext(0, "cnn1", 1, 16, 3, ClientConfig(zoo=["cnn1"])))
    snapshots = []

    def snapshot() -> None:
        snapshots.append({k: v.detach().clone() for k, v in client.model.state_dict().items()})

    snapshot()
    client.on_train_epoch_end = snapshot  # type: ignore[method-assign]
    outcome = next(iter(SequentialExecutor({"accelerator": "cpu"}).fit([FitJob(client, shards.clients[0], 3, 3)])))
    assert outcome.error is None
    assert len(snapshots) == 4  # before, and after each of the 3 epochs

    def changed(a: dict, b: dict, part: str) -> bool:
        return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(part))

    for epoch in (1, 2):  # head epochs: the body as it was
        assert changed(snapshots[epoch - 1], snapshots[epoch], "head.")
        assert not changed(snapshots[epoch - 1], snapshots[epoch], "extractor.")
    assert changed(snapshots[2], snapshots[3], "extractor.")  # the body epoch: the head as it was
    assert not changed(snapshots[2], snapshots[3], "head.")
    assert all(p.requires_grad for p in client.parameters())  # nothing stays frozen after the fit


def test_fedper_trains_body_and_head_together() -> None:
    shards = data()
    client = FedPer().build_client(ClientContext(0, "cnn1", 1, 16, 3, ClientConfig(zoo=["cnn1"])))
    before = {k: v.clone() for k, v in client.model.state_dict().items()}
    next(iter(SequentialExecutor({"accelerator": "cpu"}).fit([FitJob(client, shards.clients[0], 3, 1)])))
    after = client.model.state_dict()
    for part in ("extractor.", "head."):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(part)), part


@pytest.mark.parametrize("method", [FedPer(), FedRep()], ids=["fedper", "fedrep"])
def test_a_heterogeneous_zoo_is_refused(method) -> None:
    with pytest.raises(ValueError, match=r"client.zoo is \['cnn1', 'cnn3'\].*\[cnn1\]"):
        method.check(ClientConfig(zoo=["cnn1", "cnn3"]))
    method.check(ClientConfig(zoo=["cnn3"]))


def test_fedrep_refuses_a_fit_without_a_head_epoch_before_anything_is_written(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match="body_epochs=0"):
        FedRep(body_epochs=0)
    method = {"algorithm": {"class_path": "fedmoe_pl.algorithms.FedRep"}, "client": {"zoo": ["cnn3"]}}
    with pytest.raises(SystemExit) as done:
        main(["fit", "--config", str(tiny_config(tmp_path)), "--config", str(overlay(tmp_path, "fedrep", method))])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "local_epochs is 1 and body_epochs 1" in err and "raise federation.local_epochs" in err
    assert not (tmp_path / "run").exists()
