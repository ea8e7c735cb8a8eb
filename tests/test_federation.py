import pytest
from helpers import RecordingTracker

from fedmoe_pl.aggregation import payload_bytes
from fedmoe_pl.algorithms import ClientConfig, PFedMoE, Standalone
from fedmoe_pl.data import IID, FederatedDataModule, Synthetic
from fedmoe_pl.fleets.in_process import InProcessFleet
from fedmoe_pl.run.federation import Federation, FederationConfig, clients_per_round, sample_clients
from fedmoe_pl.run.rundir import RunDirectory
from fedmoe_pl.run.sinks import MetricsFile, Sink, Wandb


def small_federation(
    tmp_path, algorithm, num_clients=4, participation=1.0, rounds=2, eval_every=1, sinks=()
) -> Federation:
    data = FederatedDataModule(
        Synthetic(num_classes=2, train_per_class=24, test_per_class=8), IID(), num_clients, batch_size=16
    )
    data.setup(0)
    cfg = FederationConfig(rounds=rounds, participation=participation, eval_every=eval_every)
    fleet = InProcessFleet(data, ClientConfig(zoo=["cnn5"]), algorithm, 3)
    return Federation(cfg, algorithm, fleet, seed=3, sinks=sinks)


@pytest.mark.parametrize(("c", "n", "m"), [(1.0, 10, 10), (0.2, 50, 10), (0.1, 100, 10), (0.7, 10, 7), (0.01, 10, 1)])
def test_clients_per_round_is_the_ceiling_of_c_times_n(c, n, m) -> None:
    assert clients_per_round(c, n) == m


def test_sampling_is_a_pure_function_of_seed_and_round() -> None:
    a = [sample_clients(5, r, 50, 10) for r in range(1, 30)]
    assert a == [sample_clients(5, r, 50, 10) for r in range(1, 30)]
    assert a != [sample_clients(6, r, 50, 10) for r in range(1, 30)]
    assert all(len(set(s)) == 10 and s == sorted(s) for s in a)
    assert len({tuple(s) for s in a}) > 20  # rounds differ


def test_the_schedule_is_the_same_for_every_method(tmp_path) -> None:
    moe = small_federation(tmp_path / "a", PFedMoE(gate_hidden=8), num_clients=6, participation=0.5, rounds=4)
    alone = small_federation(tmp_path / "b", Standalone(), num_clients=6, participation=0.5, rounds=4)
    assert moe.schedule == alone.schedule and len(moe.schedule[0]) == 3


def test_partial_participation_sends_the_current_global_to_clients_that_fell_behind(tmp_path) -> None:
    fed = small_federation(tmp_path, PFedMoE(gate_hidden=8), num_clients=6, participation=0.5, rounds=3)
    size = payload_bytes(fed.algorithm.global_payload)
    fed.run()
    expected_down, held = 0, [-1] * 6
    for version, sampled in enumerate(fed.schedule):
        expected_down += size * sum(held[k] != version for k in sampled)  # catch-up before training
        expected_down += size * len(sampled)  # broadcast after aggregation
        for k in sampled:
            held[k] = version + 1
    assert fed.totals["bytes_down"] == expected_down
    assert fed.totals["bytes_up"] == 3 * 3 * size


def test_each_round_is_logged_once_with_step_equal_to_round(tmp_path) -> None:
    tracker, run_dir = RecordingTracker(), RunDirectory(tmp_path)
    sinks = [MetricsFile(run_dir), Wandb(tracker)]
    small_federation(tmp_path, PFedMoE(gate_hidden=8), rounds=3, eval_every=2, sinks=sinks).run()
    steps = [step for _, step, *_ in tracker.calls]
    assert steps == [1, 2, 3]
    assert [r["round"] for r in run_dir.read_metrics()] == [2, 3]  # evaluated rounds, plus always the last
    metrics, _, tables, _ = tracker.calls[1]
    for key in (
        "mean_acc",
        "weighted_acc",
        "std_acc",
        "min_acc",
        "bytes_up",
        "bytes_down",
        "total_bytes_up",
        "total_bytes_down",
        "wall_s",
        "client_acc/0",
        "client_gate_global/3",
    ):
        assert key in metrics, key
    columns, rows = tables["clients"]
    assert columns[:3] == ["client", "model", "client_acc"] and len(rows) == 4
    assert "mean_acc" not in tracker.calls[0][0]  # round 1 was not evaluated


class EventLog(Sink):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_run_start(self, fed) -> None:
        self.events.append(("start", fed.round))

    def on_round_end(self, fed, record) -> None:
        self.events.append(("round", record["round"]))

    def on_run_end(self, fed, summary) -> None:
        self.events.append(("end", summary["status"], summary["rounds"]))


def test_sinks_see_every_event_in_order_also_when_a_round_fails(tmp_path, monkeypatch) -> None:
    log = EventLog()
    small_federation(tmp_path, Standalone(), rounds=2, sinks=[log]).run()
    assert log.events == [("start", 0), ("round", 1), ("round", 2), ("end", "completed", 2)]

    failing = EventLog()
    fed = small_federation(tmp_path, Standalone(), rounds=2, sinks=[failing])
    calls = {"n": 0}

    def configure(round_, ids):
        calls["n"] += 1
        if round_ == 2:
            raise RuntimeError("server fault")
        return {}

    monkeypatch.setattr(fed.algorithm, "configure", configure)
    with pytest.raises(RuntimeError, match="server fault"):
        fed.run()
    assert failing.events == [("start", 0), ("round", 1), ("end", "failed", 1)]
