"""``fedmoe-pl report``: numbers equal the runs' own files; FLOPs are torch's own count."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import overlay, tiny_config
from torch.utils.flop_counter import FlopCounterMode

from fedmoe_pl.cli import main
from fedmoe_pl.cluster.grid import Grid, write_cell_file
from fedmoe_pl.models import build_model


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _csv(path: Path) -> dict[tuple[str, str], dict]:
    with open(path) as f:
        return {(r["setting"], r["method"]): r for r in csv.DictReader(f)}


def test_training_flops_per_round_of_cnn1_are_torchs_count(tmp_path: Path, capsys) -> None:
    config = tiny_config(tmp_path)
    fedavg = overlay(tmp_path, "fedavg", {"algorithm": {"class_path": "fedmoe_pl.algorithms.FedAvg"}})
    main(["fit", "--config", str(config), "--config", str(fedavg), "--client.zoo=[cnn1]"])
    run = tmp_path / "run"

    # Counted here on a fresh CNN-1 for the synthetic data's shape: 1 channel, 16x16, 6 classes.
    model = build_model("cnn1", in_channels=1, image_size=16, num_classes=6)
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    per_sample = counter.get_total_flops() / 4
    samples = sum(c["train_samples"] for c in json.loads((run / "summary.json").read_text())["clients"])
    for row in _rows(run / "metrics.jsonl"):
        assert row["train_flops"] == round(per_sample * samples)  # every client trains one epoch per round
    assert json.loads((run / "summary.json").read_text())["total_train_flops"] == 2 * round(per_sample * samples)

    capsys.readouterr()
    main(["report", str(run), "--output", str(tmp_path / "report")])
    (row,) = _csv(tmp_path / "report" / "report.csv").values()
    assert float(row["flops_per_round"]) == round(per_sample * samples)


def test_report_numbers_equal_the_cells_summaries(tmp_path: Path, capsys) -> None:
    tiny_config(tmp_path)
    (tmp_path / "moe.yaml").write_text("algorithm: {class_path: fedmoe_pl.algorithms.PFedMoE}\n")
    (tmp_path / "alone.yaml").write_text("algorithm: {class_path: fedmoe_pl.algorithms.Standalone}\n")
    (tmp_path / "few.yaml").write_text("data: {num_clients: 3}\n")
    grid_file = tmp_path / "grid.yaml"
    grid_file.write_text(
        yaml.safe_dump(
            {
                "base": "tiny.yaml",
                "axes": {"scale": {"n3": "few.yaml"}, "method": {"pfedmoe": "moe.yaml", "standalone": "alone.yaml"}},
                "seeds": [7, 8],
                "args": ["--federation.rounds=3"],
                "output": str(tmp_path / "out"),
            }
        )
    )
    cells = Grid.load(grid_file).cells()
    for cell in cells:  # in this process: what the local launcher runs in a child process
        write_cell_file(cell)
        main(["fit", *cell.fit_args()])
    capsys.readouterr()
    main(["report", str(tmp_path / "out"), "--output", str(tmp_path / "report"), "--target", "0.8"])

    table = _csv(tmp_path / "report" / "report.csv")
    assert set(table) == {("n3", "pfedmoe"), ("n3", "standalone")}
    for method in ("pfedmoe", "standalone"):
        runs = [Path(c.run_dir) for c in cells if c.axes["method"] == method]
        summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
        row = table[("n3", method)]
        assert row["seeds"] == "7 8"
        for key in ("final_mean_acc", "best_mean_acc", "wall_s"):
            values = [s[key] for s in summaries]
            assert float(row[key]) == pytest.approx(np.mean(values), abs=1e-12)
            assert float(row[f"{key}_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert float(row["bytes_up_per_round"]) == pytest.approx(np.mean([s["total_bytes_up"] / 3 for s in summaries]))
        firsts = [next(m["round"] for m in _rows(r / "metrics.jsonl") if m["mean_acc"] >= 0.8) for r in runs]
        assert float(row["rounds_to_target"]) == pytest.approx(np.mean(firsts))

    md = (tmp_path / "report" / "report.md").read_text()
    seed7 = json.loads((Path(cells[0].run_dir) / "summary.json").read_text())
    assert "| method | n3 |" in md and "## n3" in md
    assert (tmp_path / "report" / "accuracy-n3.png").stat().st_size > 10_000

    # One run given directly: the table's numbers are that run's own (std 0 over one seed).
    capsys.readouterr()
    main(["report", cells[0].run_dir, "--output", str(tmp_path / "one")])
    (row,) = _csv(tmp_path / "one" / "report.csv").values()
    assert float(row["final_mean_acc"]) == seed7["final_mean_acc"] and float(row["final_mean_acc_std"]) == 0
    assert f"{seed7['final_mean_acc'] * 100:.2f} ± 0.00" in (tmp_path / "one" / "report.md").read_text()


def test_report_refuses_a_folder_without_runs(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        main(["report", str(tmp_path), "--output", str(tmp_path / "r")])
    assert done.value.code == 2
    assert "no run directory (a folder with summary.json)" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_report_leaves_out_runs_that_did_not_complete_and_lists_them(tmp_path: Path, capsys) -> None:
    config = tiny_config(tmp_path)
    for seed in (1, 2):
        main(
            [
                "fit",
                "--config",
                str(config),
                f"--seed_everything={seed}",
                f"--federation.run_dir={tmp_path / str(seed)}",
            ]
        )
    summary = json.loads((tmp_path / "2" / "summary.json").read_text())
    (tmp_path / "2" / "summary.json").write_text(json.dumps({**summary, "status": "interrupted", "rounds": 1}))
    main(["report", str(tmp_path / "1"), str(tmp_path / "2"), "--output", str(tmp_path / "r")])
    (row,) = _csv(tmp_path / "r" / "report.csv").values()
    assert row["seeds"] == "1"
    assert f"- {tmp_path / '2'} (interrupted, 1 rounds)" in (tmp_path / "r" / "report.md").read_text()


def _toy_run(folder: Path, seed: int, accs: list[float], up: int, down: int, fits: int, flops: float) -> None:
    folder.mkdir(parents=True)
    summary = {
        "status": "completed",
        "rounds": len(accs),
        "final_mean_acc": accs[-1],
        "best_mean_acc": max(accs),
        "wall_s": 1.0,
        "total_bytes_up": up,
        "total_bytes_down": down,
        "total_reported": fits,
        "total_train_flops": flops,
    }
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "cell.json").write_text(json.dumps({"axes": {"data": "toy", "method": "m"}, "seed": seed}))
    lines = [json.dumps({"round": i + 1, "mean_acc": a}) for i, a in enumerate(accs)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_seconds_over_a_link_are_the_hand_worked_ones(tmp_path: Path, capsys) -> None:
    from fedmoe_pl.analysis.results import Link

    # Per reported fit: 0.5 MB up (4 s at 1 Mbit/s), 1 MB down (8 s), 2 GFLOP (2 s at 1 GFLOP/s).
    _toy_run(tmp_path / "runs" / "a", 0, [0.5, 0.95], up=2_000_000, down=4_000_000, fits=4, flops=8e9)
    # Twice the bytes per fit, and the target first reached in round 3.
    _toy_run(tmp_path / "runs" / "b", 1, [0.5, 0.8, 0.92], up=3_000_000, down=6_000_000, fits=3, flops=6e9)
    assert (
        Link(1, 1).seconds_per_round({"total_bytes_up": 2_000_000, "total_bytes_down": 4_000_000, "total_reported": 4})
        == 12
    )
    assert Link(10, 2, compute_flops=1e9).seconds_per_round(
        {"total_bytes_up": 2_000_000, "total_bytes_down": 4_000_000, "total_reported": 4, "total_train_flops": 8e9}
    ) == pytest.approx(0.4 + 4 + 2)
    main(
        [
            "report",
            str(tmp_path / "runs"),
            "--output",
            str(tmp_path / "out"),
            "--link-mbps",
            "1",
            "10",
            "--compute-flops",
            "1e9",
            "--target",
            "0.9",
        ]
    )
    with open(tmp_path / "out" / "report.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    name = "1 Mbit/s, 1.00 GFLOP/s"
    # a: 4 + 8 + 2 = 14 s a round, 2 rounds to 0.9; b: 8 + 16 + 2 = 26 s a round, 3 rounds.
    assert float(row[f"s_per_round@{name}"]) == pytest.approx((14 + 26) / 2)
    assert float(row[f"s_to_target@{name}"]) == pytest.approx((28 + 78) / 2)
    assert float(row["s_per_round@10 Mbit/s, 1.00 GFLOP/s"]) == pytest.approx((0.4 + 0.8 + 2 + 0.8 + 1.6 + 2) / 2)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| toy | m | 20 | 53 |" in report


def test_a_link_rate_that_cannot_be_is_refused(tmp_path: Path, capsys) -> None:
    _toy_run(tmp_path / "runs" / "a", 0, [0.5], up=1, down=1, fits=1, flops=1.0)
    with pytest.raises(SystemExit) as done:
        main(["report", str(tmp_path / "runs"), "--output", str(tmp_path / "out"), "--link-mbps", "0"])
    assert done.value.code == 2 and "up_mbps=0.0 must be a positive number" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_grid_of_methods_alone_names_its_setting_from_the_config(tmp_path: Path) -> None:
    from fedmoe_pl.analysis.results import load_run

    run = tmp_path / "pfedmoe-seed0"
    _toy_run(run, 0, [0.5, 0.9], up=1, down=1, fits=1, flops=1.0)
    (run / "cell.json").write_text(json.dumps({"axes": {"method": "pfedmoe"}, "seed": 0}))
    config = {
        "algorithm": {"class_path": "fedmoe_pl.algorithms.PFedMoE"},
        "data": {"source": {"class_path": "fedmoe_pl.data.FashionMNIST"}, "num_clients": 50},
        "client": {"zoo": ["cnn1", "cnn2"]},
        "federation": {"participation": 0.2},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    loaded = load_run(run)
    assert (loaded.method, loaded.setting, loaded.seed) == ("pfedmoe", "FashionMNIST-N50-C0.2-hetero", 0)


@pytest.mark.slow
def test_a_runs_summary_times_its_cost_over_the_configured_links(tmp_path: Path, capsys) -> None:
    from fedmoe_pl.analysis.results import CostConfig

    summary = {
        "total_bytes_up": 2_000_000,
        "total_bytes_down": 4_000_000,
        "total_reported": 4,
        "total_train_flops": 8e9,
    }
    rows = [{"round": 1, "mean_acc": 0.5}, {"round": 2, "mean_acc": None}, {"round": 3, "mean_acc": 0.81}]
    cost = CostConfig(up_mbps=[1, 10], down_mbps=[4, 10], compute_flops=1e9, target=0.8)
    time = cost.section(summary, rows)
    # per fit: 500 kB up at 1 Mbit/s = 4 s, 1 MB down at 4 Mbit/s = 2 s, 2 GFLOP at 1 GFLOP/s = 2 s
    assert time["rounds_to_target"] == 3 and [link["name"] for link in time["links"]] == [
        "1/4 Mbit/s, 1.00 GFLOP/s",
        "10 Mbit/s, 1.00 GFLOP/s",
    ]
    assert time["links"][0]["s_per_round"] == pytest.approx(8.0) and time["links"][0]["s_to_target"] == pytest.approx(
        24.0
    )
    assert time["links"][1]["s_per_round"] == pytest.approx(0.4 + 0.8 + 2.0)
    assert CostConfig(target=0.9).section(summary, rows)["links"][0]["s_to_target"] is None  # never reached
    assert "s_to_target" not in CostConfig().section(summary, rows)["links"][0]
    for bad, message in (({"down_mbps": [1.0]}, "does not match cost.up_mbps"), ({"target": 1.5}, "cost.target=1.5"),
                         ({"up_mbps": [0.0]}, "up_mbps=0.0 must be a positive number")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            CostConfig(**bad)

    config = tiny_config(tmp_path, rounds=2)
    main(["fit", "--config", str(config), "--cost.target", "0.01", "--cost.up_mbps", "[2]"])
    written = json.loads((tmp_path / "run" / "summary.json").read_text())
    (link,) = written["time"]["links"]
    fits = written["total_reported"]
    expected = 8 * written["total_bytes_up"] / fits / 2e6 + 8 * written["total_bytes_down"] / fits / 2e6
    assert written["time"]["rounds_to_target"] == 1 and link["s_per_round"] == pytest.approx(expected)
    # The cost changes no result: a resumed run may time itself over other links.
    main(
        [
            "fit",
            "--config",
            str(config),
            "--federation.rounds",
            "3",
            "--cost.up_mbps",
            "[5]",
            "--resume",
            str(tmp_path / "run"),
        ]
    )
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["time"]["links"][0]["up_mbps"] == 5


def _fake_cell(root: Path, axes: dict[str, str], seed: int, acc: float) -> None:
    """A finished grid cell as the report reads it: cell.json, config.yaml, summary.json, metrics.jsonl."""
    run = root / ("-".join(axes.values()) + f"-seed{seed}")
    run.mkdir(parents=True)
    (run / "cell.json").write_text(json.dumps({"axes": axes, "seed": seed}))
    config = {"algorithm": {"class_path": "fedmoe_pl.algorithms.PFedMoE"}, "client": {"zoo": ["cnn1", "cnn2"]},
              "data": {"source": {"class_path": "fedmoe_pl.data.Synthetic"}, "num_clients": 4},
              "federation": {"participation": 1.0}}  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    summary = {"status": "completed", "rounds": 2, "final_mean_acc": acc, "best_mean_acc": acc, "wall_s": 1.0,
               "total_bytes_up": 8, "total_bytes_down": 8, "total_train_flops": 4, "total_reported": 2}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "metrics.jsonl").write_text(json.dumps({"round": 2, "mean_acc": acc}) + "\n")


def test_a_pivot_lays_an_ablation_out_as_rows_by_columns(tmp_path: Path, capsys) -> None:
    from fedmoe_pl.analysis.results import write_report

    grid = tmp_path / "grid"
    accs = {("switch", "h16"): [0.90, 0.92], ("switch", "h64"): [0.95, 0.97], ("none", "h16"): [0.80, 0.84],
            ("switch", "h256"): [0.5]}  # fmt: skip
    for (norm, hidden), values in accs.items():
        for seed, acc in enumerate(values):
            _fake_cell(grid, {"data": "quick", "norm": norm, "hidden": hidden}, seed, acc)
    write_report([grid], tmp_path / "out", pivot=("norm", "hidden"))
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## quick: final mean client test accuracy (%), norm x hidden, mean ± std (seeds)" in text
    assert "| norm \\ hidden | h16 | h64 | h256 |" in text  # widths in natural order
    assert "| switch | 91.00 ± 1.41 (2) | 96.00 ± 1.41 (2) | 50.00 ± 0.00 (1) |" in text
    assert "| none | 82.00 ± 2.83 (2) |  |  |" in text  # a cell that did not run stays empty
    assert (tmp_path / "out" / "pivot-quick.png").stat().st_size > 0
    capsys.readouterr()
    for pivot, message in ((("norm", "norm"), "two different axes"), (("norm", "width"), "no grid axis 'width'")):
        with pytest.raises(ValueError, match=message):
            write_report([grid], tmp_path / "out2", pivot=pivot)
        assert not (tmp_path / "out2").exists()
