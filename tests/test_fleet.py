"""A toy fleet written from the README's "Adding a place for clients" alone, and the seam's direction."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from fedmoe_pl.aggregation import payload_bytes
from fedmoe_pl.algorithms import ClientConfig, ClientContext, ClientResult, FederatedClient, Instruction
from fedmoe_pl.algorithms.pfedmoe import PFedMoE
from fedmoe_pl.analysis.evaluation import Evaluator, summarize
from fedmoe_pl.data import FederatedDataModule, Pathological, Synthetic
from fedmoe_pl.fleets.fleet import Cohort, FitOutcome
from fedmoe_pl.run.federation import Federation, FederationConfig
from fedmoe_pl.run.rundir import RunDirectory
from fedmoe_pl.run.sinks import Checkpoint


class PlainLoopFleet:
    """Clients in a dict, trained by a plain PyTorch loop (no Lightning), every call written down."""

    resumable = False

    def __init__(self, data: FederatedDataModule, algorithm: PFedMoE, zoo: list[str]) -> None:
        self.data, self.calls = data, []
        cfg = ClientConfig(zoo=zoo, lr=0.05)
        dims = (data.in_channels, data.image_size, data.num_classes)
        self.by_id = {
            cid: algorithm.build_client(ClientContext(cid, cfg.model_for(cid), *dims, cfg))
            for cid in range(data.num_clients)
        }
        self.num_clients = data.num_clients
        self.model_names = [cfg.model_for(cid) for cid in range(data.num_clients)]
        self.fingerprint = data.fingerprint

    def clients(self) -> Sequence[FederatedClient]:
        return [self.by_id[cid] for cid in range(self.num_clients)]

    def deliver(self, instructions: dict[int, Instruction]) -> int:
        self.calls.append(("deliver", sorted(instructions)))
        sent = 0
        for cid, instruction in instructions.items():
            if instruction.payload is not None:
                self.by_id[cid].download(instruction.payload)
                sent += payload_bytes(instruction.payload)
            self.by_id[cid].configure_round(**instruction.settings)
        return sent

    def fit(self, cohort: Cohort) -> Iterator[FitOutcome]:
        self.calls.append(("fit", cohort.ids))
        for cid, seed in cohort.seeds.items():
            client, shard = self.by_id[cid], self.data.clients[cid]
            shard.shuffle_seed = seed
            sgd = torch.optim.SGD(client.parameters(), lr=client.config.lr, momentum=client.config.momentum)
            client.train()
            losses = []
            for _ in range(cohort.epochs):
                losses = []
                for x, y in shard.train_batches():
                    loss = client.training_loss(x, y)
                    sgd.zero_grad()
                    loss.backward()
                    sgd.step()
                    losses.append(loss.item())
            result = ClientResult(cid, client.upload(), shard.num_train, {"train_loss": sum(losses) / len(losses)})
            yield FitOutcome(cid, result=result)

    def evaluate(self, round_: int, ids: Sequence[int], confusion: bool) -> dict[str, Any]:
        self.calls.append(("evaluate", list(ids)))
        evaluator = Evaluator()
        scores = {
            cid: evaluator.score_client(self.by_id[cid], self.data.clients[cid], self.data.num_classes, confusion)
            for cid in ids
        }
        return summarize(scores, self.data.num_classes, confusion)

    def end_round(self, round_: int) -> dict[str, Any]:
        self.calls.append(("end_round", round_))
        return {"toy_round": round_}

    def flops_per_sample(self, client_id: int) -> float:
        return 1.0

    def describe(self, client_id: int) -> dict[str, Any]:
        shard = self.data.clients[client_id]
        params = sum(p.numel() for p in self.by_id[client_id].parameters())
        return {
            "model": self.model_names[client_id],
            "params_total": params,
            "train_samples": shard.num_train,
            "test_samples": shard.num_test,
        }

    def state_dict(self) -> Any:
        raise AssertionError("not resumable: the loop must not ask")

    def load_state_dict(self, state: Any) -> None:
        raise AssertionError("not resumable: the loop must not ask")

    def checkpoint_saved(self) -> None:
        raise AssertionError("not resumable: the loop must not ask")


def test_a_toy_fleet_runs_the_loop_and_sees_only_its_own_calls(tmp_path: Path) -> None:
    source = Synthetic(num_classes=4, train_per_class=40, image_size=16)
    data = FederatedDataModule(source, Pathological(2), 4, batch_size=16)
    data.setup(0)
    algorithm = PFedMoE(gate_hidden=16)
    fleet = PlainLoopFleet(data, algorithm, ["cnn5", "cnn3"])
    cfg = FederationConfig(rounds=3, participation=0.5, run_dir=str(tmp_path))
    run_dir = RunDirectory(tmp_path)
    fed = Federation(cfg, algorithm, fleet, seed=1, sinks=[Checkpoint(run_dir, {})])
    summary = fed.run()
    assert summary["status"] == "completed" and summary["total_reported"] == 6
    assert summary["final_mean_acc"] > 0.5 and summary["total_train_flops"] > 0
    assert [c["model"] for c in summary["clients"]] == ["cnn5", "cnn3", "cnn5", "cnn3"]
    assert not (tmp_path / "last.ckpt").exists()  # not resumable: no checkpoint
    for round_ in (1, 2, 3):
        sampled = fed.schedule[round_ - 1]
        calls = fleet.calls[(round_ - 1) * 5 : round_ * 5]
        assert [name for name, _ in calls] == ["deliver", "fit", "deliver", "evaluate", "end_round"]
        assert calls[1][1] == sampled and calls[3][1] == [0, 1, 2, 3] and calls[4][1] == round_  # eval_clients: all
    assert fed.final is not None and fed.final["toy_round"] == 3  # what the fleet measured is in the record


def test_the_loop_imports_no_place_where_clients_live() -> None:
    """federation.py talks to a fleet; executors, pools, evaluators and data stay behind it."""
    source = (Path(__file__).resolve().parents[1] / "fedmoe_pl" / "run" / "federation.py").read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    for module in ("executor", "batched", "distributed", "clients", "evaluation", "data", "in_process", "flower"):
        assert not any(f"fedmoe_pl.{module}" in line for line in imports), module
    assert len(source.splitlines()) <= 220


def test_a_stop_that_a_fleet_turned_into_its_own_error_ends_the_run_as_stopped(tmp_path: Path) -> None:
    import signal

    import pytest

    from fedmoe_pl.errors import Interrupted

    class CleanUpFails(PlainLoopFleet):
        def end_round(self, round_: int) -> dict[str, Any]:
            try:
                raise Interrupted(signal.SIGTERM, final=True)  # the signal, mid-write
            except Interrupted:
                raise RuntimeError("the writer's clean-up failed") from None

    source = Synthetic(num_classes=4, train_per_class=10, image_size=16)
    data = FederatedDataModule(source, Pathological(2), 2, batch_size=16)
    data.setup(0)
    algorithm = PFedMoE(gate_hidden=8)
    fleet = CleanUpFails(data, algorithm, ["cnn5"])
    summaries: list[dict[str, Any]] = []

    class Keep:
        def on_run_start(self, fed: Federation) -> None: ...
        def on_round_end(self, fed: Federation, record: dict[str, Any]) -> None: ...
        def on_run_end(self, fed: Federation, summary: dict[str, Any]) -> None:
            summaries.append(summary)

    fed = Federation(FederationConfig(rounds=2, run_dir=str(tmp_path)), algorithm, fleet, seed=0, sinks=[Keep()])
    with pytest.raises(Interrupted) as stop:
        fed.run()
    assert stop.value.final and isinstance(stop.value.__cause__, RuntimeError)
    assert summaries[0]["status"] == "stopped" and summaries[0]["reason"] == "SIGTERM"
