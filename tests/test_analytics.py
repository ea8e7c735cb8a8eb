"""Evaluation and gate analytics: exact against hand counts; a collapsed gate is told from an input-dependent one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import RecordingTracker, tiny_config
from torch import nn

from fedmoe_pl.analysis.evaluation import Evaluator
from fedmoe_pl.cli import _experiment, build_parser, main, subcommand_parser
from fedmoe_pl.data import ClientDataModule
from fedmoe_pl.data.transforms import BatchTransform
from fedmoe_pl.run.experiment import build_federation
from fedmoe_pl.run.rundir import RunDirectory
from fedmoe_pl.run.sinks import Wandb

CLASSES = 4


class Scripted(nn.Module):
    """A client whose prediction and gate weight are written into each test image.

    Pixel (0, 0) holds the predicted class, pixel (0, 1) the gate weight x 255; a ``constant``
    gate ignores the image.
    """

    def __init__(self, client_id: int, constant_gate: float | None = None) -> None:
        super().__init__()
        self.client_id, self.constant_gate = client_id, constant_gate
        self.anchor = nn.Parameter(torch.zeros(()))  # so that .to() and .train() behave as for a model

    def predict_with_extras(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raw = (x * 255).round().long()
        logits = nn.functional.one_hot(raw[:, 0, 0, 0], CLASSES).float()
        if self.constant_gate is None:
            gate = raw[:, 0, 0, 1].float() / 255
        else:
            gate = torch.full((len(x),), self.constant_gate)
        return logits, {"gate_global": gate}


def shard(labels: list[int], preds: list[int], gates: list[int] | None = None, batch: int = 3) -> ClientDataModule:
    """A test shard whose images script the predictions (and gate weights, in 1/255)."""
    images = torch.zeros(len(labels), 1, 4, 4, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.tensor(preds, dtype=torch.uint8)
    if gates is not None:
        images[:, 0, 0, 1] = torch.tensor(gates, dtype=torch.uint8)
    plain = BatchTransform([0.0], [1.0])
    empty = (torch.zeros(0, 1, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))
    test = (images, torch.tensor(labels, dtype=torch.int64))
    return ClientDataModule(empty, test, plain, plain, eval_batch_size=batch)


def test_accuracy_equals_a_hand_count_and_per_class_accuracy_is_exact() -> None:
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]  # class 3 absent from this client's test set
    preds = [0, 1, 0, 1, 1, 2, 0, 2, 2, 1]
    out = Evaluator()([Scripted(0)], [shard(labels, preds)], num_classes=CLASSES, confusion=True)
    hand = sum(p == y for p, y in zip(preds, labels)) / len(labels)
    assert out["mean_acc"] == hand == out["per_client"]["client_acc"]["0"] == 0.7
    assert out["per_client_class"]["client_class_acc"]["0"] == {"0": 2 / 3, "1": 1.0, "2": 0.6}
    confusion = torch.tensor(out["confusion"])
    assert confusion.sum() == 10 and confusion.trace() == 7 and confusion[2, 0] == 1 and confusion[0, 1] == 1


def test_an_empty_test_shard_is_excluded_and_reported_not_scored_zero() -> None:
    clients = [Scripted(0), Scripted(1), Scripted(2)]
    shards = [shard([0, 1], [0, 0]), shard([], []), shard([2, 2, 3, 3], [2, 2, 3, 3])]
    out = Evaluator()(clients, shards, num_classes=CLASSES)
    assert out["no_test_clients"] == [1] and set(out["per_client"]["client_acc"]) == {"0", "2"}
    assert out["mean_acc"] == (0.5 + 1.0) / 2 and out["min_acc"] == 0.5
    assert out["weighted_acc"] == (1 + 4) / 6


def test_gate_analytics_tell_a_collapsed_gate_from_an_input_dependent_one() -> None:
    labels = [0, 0, 0, 0, 1, 1, 1, 1]
    gates = [20, 30, 25, 35, 200, 230, 220, 240]  # the input-dependent gate leans global on class 1
    clients = [Scripted(0, constant_gate=0.75), Scripted(1)]
    shards = [shard(labels, labels), shard(labels, labels, gates)]
    out = Evaluator()(clients, shards, num_classes=CLASSES)
    per_client, by_class, histograms = out["per_client"], out["per_client_class"], out["histograms"]
    assert out["gate_global_collapsed"] == [0]
    assert per_client["gate_global_spread"]["0"] == 0.0 and per_client["gate_global_spread"]["1"] > 0.3
    assert by_class["gate_global_class_mean"]["0"] == {"0": 0.75, "1": 0.75}
    mean = by_class["gate_global_class_mean"]["1"]
    assert mean == {"0": round(110 / 4 / 255, 4), "1": round(890 / 4 / 255, 4)}
    assert by_class["gate_global_class_q10"]["1"]["0"] < by_class["gate_global_class_q90"]["1"]["0"] < 0.2
    assert histograms["gate_global"]["0"] == [0] * 7 + [8] + [0] * 2  # every sample at 0.75
    assert sum(histograms["gate_global"]["1"][:2]) == 4 and sum(histograms["gate_global"]["1"][7:]) == 4
    assert per_client["client_gate_global"]["0"] == 0.75
    assert set(out) == {  # every value in the section of its kind; only averages and client lists at the top
        *("mean_acc", "weighted_acc", "std_acc", "min_acc", "mean_balanced_acc", "no_test_clients"),
        "gate_global_collapsed",
        *("per_client", "per_client_class", "histograms"),
    }


def test_plot_draws_the_pictures_of_a_two_round_run(tmp_path: Path, capsys) -> None:
    main(["fit", "--config", str(tiny_config(tmp_path))])
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("gate_global_class_mean" in r["per_client_class"] and "gate_global" in r["histograms"] for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    confusion = torch.tensor(summary["confusion"])
    tests = sum(c["test_samples"] for c in summary["clients"])
    assert confusion.sum() == tests and confusion.trace() / tests == pytest.approx(summary["final_weighted_acc"])
    assert all(0 < r["per_client"]["gate_switch_mean_batch"]["0"] < 1 for r in rows)  # the Switchable-Norm mix
    expected = {"accuracy", "client_accuracy", "communication", "gate_by_class", "gate_histograms", "switch_norm"}
    assert {p.stem for p in run.glob("*.png")} == expected  # drawn at the end of the run
    for picture in run.glob("*.png"):
        picture.unlink()
    main(["plot", str(run), "--output", str(tmp_path / "pictures")])
    assert {p.stem for p in (tmp_path / "pictures").glob("*.png")} == expected
    assert all(p.stat().st_size > 10_000 for p in (tmp_path / "pictures").glob("*.png"))

    # A run directory of an earlier version kept every value at the top level, histograms as ``<gate>_hist``:
    # it reads as the same records, and plots the same pictures.
    def flat(record: dict) -> dict:
        out = {k: v for k, v in record.items() if k not in ("per_client", "per_client_class", "histograms")}
        out.update(record["per_client"], **record["per_client_class"])
        out.update({f"{name}_hist": counts for name, counts in record["histograms"].items()})
        return out

    (run / "metrics.jsonl").write_text("".join(json.dumps(flat(r)) + "\n" for r in rows))
    assert "client_acc" in json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert RunDirectory(run).read_metrics() == rows
    main(["plot", str(run), "--output", str(tmp_path / "old")])
    assert {p.stem for p in (tmp_path / "old").glob("*.png")} == expected


def test_plot_of_a_folder_without_metrics_says_so(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["plot", str(tmp_path)])
    assert done.value.code == 2 and "has no metrics.jsonl" in capsys.readouterr().err


def test_gate_analytics_reach_wandb_as_tables_and_histograms_at_step_round(tmp_path: Path) -> None:
    parser = subcommand_parser(build_parser(), "fit")
    exp = _experiment(parser, parser.parse_args(["--config", str(tiny_config(tmp_path))]))
    exp.data.setup(exp.seed)
    tracker = RecordingTracker()
    build_federation(exp, [Wandb(tracker)]).run()
    assert [step for _, step, *_ in tracker.calls] == [1, 2]
    for _, _, tables, histograms in tracker.calls:
        columns, rows = tables["by_class"]
        gate = ["gate_global_class_mean", "gate_global_class_q10", "gate_global_class_q50", "gate_global_class_q90"]
        assert columns == ["client", "model", "class", "client_class_acc", *gate]
        assert [(r[0], r[2]) for r in rows] == [(c, k) for c in range(3) for k in (2 * c, 2 * c + 1)]
        assert all(0 <= r[3] <= 1 and 0 <= r[5] <= r[6] <= r[7] <= 1 for r in rows)
        assert set(histograms["gate_global"]) == {"0", "1", "2"}


def test_the_switchable_norm_mix_of_each_client_is_recorded_as_learned() -> None:
    from fedmoe_pl.algorithms import ClientConfig, ClientContext, PFedMoE
    from fedmoe_pl.analysis.evaluation import summarize

    ctx = ClientContext(0, "cnn3", 1, 16, CLASSES, ClientConfig(zoo=["cnn3"]))
    client = PFedMoE(gate_hidden=8).build_client(ctx)
    norm = client.moe.gate.norm
    with torch.no_grad():
        norm.mean_logits.copy_(torch.tensor([0.0, 1.0]))  # batch weight e / (1 + e)
        norm.var_logits.copy_(torch.tensor([2.0, 0.0]))  # batch weight 1 / (1 + e^2)
    e = torch.e
    assert client.diagnostics() == pytest.approx(
        {"gate_switch_mean_batch": e / (1 + e), "gate_switch_var_batch": 1 / (1 + e**2)}
    )
    out = summarize(
        {0: {"acc": 1.0, "class_acc": {}, "means": {}, "gate": {}, "n": 1, "model": client.diagnostics()}}, CLASSES
    )
    assert out["per_client"]["gate_switch_mean_batch"] == {"0": round(e / (1 + e), 4)}
    assert PFedMoE(gate_hidden=8, gate_norm="layer").build_client(ctx).diagnostics() == {}  # no mix to learn
