"""Any Lightning logger as a sink: ``loggers:`` in the config, each logging every round at step = round."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
from helpers import overlay, tiny_config

from fedmoe_pl.cli import main


def _tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar in a folder's TensorBoard event files, read record by record (TFRecord framing:
    length, its CRC, the serialized ``Event``, its CRC): ``{tag: {step: value}}``."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in folder.rglob("events.out.tfevents.*"):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = event_pb2.Event.FromString(data[at + 12 : at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_csv_and_tensorboard_loggers_get_every_round_at_its_step(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    loggers = {
        "loggers": [
            {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(logs), "name": "csv"}},
            {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(logs), "name": "tb"},
            },
        ]
    }
    main(["fit", "--config", str(tiny_config(tmp_path, rounds=3)), "--config", str(overlay(tmp_path, "log", loggers))])
    rounds = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]

    with open(next((logs / "csv").rglob("metrics.csv")), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(row["step"]) for row in rows] == [1, 2, 3]
    for row, record in zip(rows, rounds):
        assert float(row["mean_acc"]) == pytest.approx(record["mean_acc"])
        assert float(row["train_loss"]) == pytest.approx(record["train_loss"])
        assert float(row["client_acc/1"]) == pytest.approx(
            record["per_client"]["client_acc"]["1"]
        )  # per client: key/client
        assert float(row["total_bytes_up"]) == record["total_bytes_up"]
    hparams = (next((logs / "csv").rglob("hparams.yaml"))).read_text()
    assert "seed_everything" in hparams and "PFedMoE" in hparams

    scalars = _tensorboard_scalars(logs / "tb")
    assert sorted(scalars["mean_acc"]) == [1, 2, 3]
    for record in rounds:
        assert scalars["mean_acc"][record["round"]] == pytest.approx(record["mean_acc"], rel=1e-6)
        assert scalars["client_acc/0"][record["round"]] == pytest.approx(
            record["per_client"]["client_acc"]["0"], rel=1e-6
        )


def test_a_logger_that_is_not_a_lightning_logger_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    bad = {"loggers": [{"class_path": "collections.OrderedDict"}]}
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(tiny_config(tmp_path)), "--config", str(overlay(tmp_path, "bad", bad))])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "loggers" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_loggers_may_change_on_resume(tmp_path: Path) -> None:
    """A logger changes no result: a resume may add or drop one."""
    config = tiny_config(tmp_path, rounds=1)
    main(["fit", "--config", str(config)])
    csv_logger = {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": str(tmp_path / "logs")},
    }
    loggers = {"loggers": [csv_logger]}
    log_config = overlay(tmp_path, "log", {**loggers, "federation": {"rounds": 2}})
    main(["fit", "--config", str(config), "--config", str(log_config), "--resume", str(tmp_path / "run")])
    with open(next((tmp_path / "logs").rglob("metrics.csv")), newline="") as fh:
        assert [int(row["step"]) for row in csv.DictReader(fh)] == [2]  # the rounds this process trained
