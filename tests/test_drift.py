"""Data that drifts over rounds: the schedule's phases, each kind of change, the refusals, and a run
that reports forgetting and resumes to the uninterrupted result."""

from __future__ import annotations

import json
import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import assert_same_run, tiny_config

from fedmoe_pl.cli import main
from fedmoe_pl.data import Drift, FederatedDataModule, Pathological, Synthetic
from fedmoe_pl.data.drift import Schedule


def _data(*drift: Drift, num_clients: int = 4, classes: int = 2) -> FederatedDataModule:
    data = FederatedDataModule(
        Synthetic(num_classes=8, train_per_class=20, test_per_class=6),
        Pathological(classes_per_client=classes),
        num_clients=num_clients,
        drift=list(drift),
    )
    data.setup(3)
    return data


def _labels(shard) -> tuple[set[int], set[int]]:
    return set(shard.train_labels.tolist()), set(shard.test_labels.tolist())


def test_a_schedule_s_phases_by_hand() -> None:
    schedule = Schedule(
        [
            Drift(round=5, kind="arrive", classes=[6]),
            Drift(round=3, kind="rotate", step=1),
            Drift(round=4, kind="shift", invert=True),
            Drift(round=4, kind="rotate", step=2),
        ],
        num_clients=4,
    )
    assert schedule.starts == [1, 3, 4, 5]
    assert [schedule.phase(r) for r in range(1, 8)] == [0, 0, 1, 2, 3, 3, 3]
    assert [schedule.source(0, c) for c in range(4)] == [0, 1, 2, 3]
    assert [schedule.source(1, c) for c in range(4)] == [1, 2, 3, 0]
    assert [schedule.source(2, c) for c in range(4)] == [3, 0, 1, 2]  # steps 1 + 2
    assert [schedule.held_back(p) for p in range(4)] == [{6}, {6}, {6}, set()]
    assert [len(schedule.shifts(p)) for p in range(4)] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"rounds \[5\], after the run's last round \(federation.rounds=4\)"):
        schedule.check_rounds(4)
    with pytest.raises(ValueError, match=r"rotate with step=8 hands every one of the 4 clients its own data back"):
        Schedule([Drift(round=2, kind="rotate", step=8)], 4)
    assert Drift.of({"round": 2, "kind": "shift", "rotation": 30}) == Drift(round=2, kind="shift", rotation=30.0)
    with pytest.raises(ValueError, match=r"classes \[9\] are not classes of the dataset \(0 .. 7\)"):
        Schedule([Drift(round=2, kind="arrive", classes=[9])], 4).check_classes(8)


def test_rotate_hands_each_client_the_next_one_s_data_from_its_round_on() -> None:
    data = _data(Drift(round=3, kind="rotate"))
    before, after = data.shards(2), data.shards(3)
    assert data.shards(1) is before and data.clients is before
    for cid in range(4):
        assert torch.equal(after[cid].train_labels, before[(cid + 1) % 4].train_labels)
        assert torch.equal(after[cid].test_images, before[(cid + 1) % 4].test_images)
    assert data.before_drift(2) is None
    assert data.before_drift(7) is data.shards(2)


def test_classes_that_arrive_are_held_back_until_their_round() -> None:
    plain = _data()
    data = _data(Drift(round=4, kind="arrive", classes=[0, 5]))
    assert plain.fingerprint != data.fingerprint
    for cid in range(4):
        holds = _labels(plain.clients[cid])
        assert _labels(data.shards(3)[cid]) == (holds[0] - {0, 5}, holds[1] - {0, 5})
        assert _labels(data.shards(4)[cid]) == holds
        assert torch.equal(data.shards(4)[cid].train_images, plain.clients[cid].train_images)
    counts = data.report()
    assert counts["clients"] == plain.report()["clients"]  # the partition itself is drawn as without drift
    assert counts["drift"] == [
        {"round": 4, "kind": "arrive", "step": 1, "classes": [0, 5], "rotation": 0.0, "noise": 0.0, "invert": False}
    ]


def test_a_client_left_without_training_data_by_held_back_classes_is_refused() -> None:
    plain = _data(classes=1)
    held = sorted(_labels(plain.clients[2])[0])
    with pytest.raises(ValueError, match=r"client 2 holds no training samples from round 1 on"):
        _data(Drift(round=3, kind="arrive", classes=held), classes=1)


def test_a_shift_changes_the_images_the_same_way_every_time() -> None:
    data = _data(Drift(round=2, kind="shift", invert=True), Drift(round=3, kind="shift", noise=0.1))
    again = _data(Drift(round=2, kind="shift", invert=True), Drift(round=3, kind="shift", noise=0.1))
    for cid in range(4):
        first = data.shards(1)[cid]
        inverted = data.shards(2)[cid]
        assert torch.equal(inverted.train_images, 255 - first.train_images)
        assert torch.equal(inverted.test_labels, first.test_labels)
        noisy = data.shards(3)[cid].train_images
        assert torch.equal(noisy, again.shards(3)[cid].train_images)  # drawn from the run's seed
        difference = noisy.float() - inverted.train_images.float()
        assert 0.05 * 255 < difference.std() < 0.15 * 255
    rotated = _data(Drift(round=2, kind="shift", rotation=90))
    assert torch.equal(rotated.shards(2)[0].test_images, torch.rot90(rotated.shards(1)[0].test_images, 1, (-2, -1)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(round=1, kind="rotate"), "round must be an integer of at least 2"),
        (dict(round=3, kind="melt"), "kind 'melt' is not one of rotate, arrive, shift"),
        (dict(round=3, kind="arrive"), "needs the classes that arrive"),
        (dict(round=3, kind="rotate", classes=[1]), "classes belong to an arrive change only"),
        (dict(round=3, kind="shift"), "a shift changes nothing"),
        (dict(round=3, kind="shift", noise=-0.1), "noise a finite number >= 0"),
        (dict(round=3, kind="rotate", rotation=30.0), "belong to a shift change only"),
        (dict(round=3, kind="arrive", classes=8), "classes must be a list of class indices"),
        (dict(round=3, kind="shift", rotation="30"), "rotation and noise must be numbers"),
        (dict(round=3, kind="shift", invert="yes"), "invert must be true or false"),
    ],
)
def test_a_change_that_cannot_work_is_refused(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Drift.of(change)


def _drift_config(tmp_path: Path, rounds: int, drift: list[dict]) -> Path:
    path = tiny_config(tmp_path, rounds=rounds)
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["drift"] = drift
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_a_drifting_run_reports_forgetting_and_resumes_to_the_uninterrupted_result(tmp_path: Path, capsys) -> None:
    drift = [{"round": 2, "kind": "rotate"}, {"round": 2, "kind": "shift", "invert": True}]
    config = _drift_config(tmp_path, 3, drift)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    main(["fit", "--config", str(config), "--federation.run_dir", str(straight)])
    records = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert "mean_acc_before_drift" not in records[0]
    for record in records[1:]:
        assert 0 <= record["mean_acc_before_drift"] <= 1
        assert sorted(record["per_client"]["client_acc_before_drift"]) == ["0", "1", "2"]
    partition = json.loads((straight / "partition.json").read_text())
    assert [change["round"] for change in partition["drift"]] == [2, 2]
    assert (straight / "accuracy.png").is_file()

    main(["fit", "--config", str(config), "--federation.run_dir", str(broken), "--federation.rounds", "2"])
    main(["fit", "--config", str(config), "--federation.run_dir", str(broken), "--resume", str(broken)])
    capsys.readouterr()
    assert_same_run(straight, broken)
    resumed = [json.loads(line) for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [r["mean_acc_before_drift"] for r in resumed[1:]] == [r["mean_acc_before_drift"] for r in records[1:]]


def test_a_change_after_the_last_round_ends_in_one_line_before_anything_is_written(tmp_path: Path, capsys) -> None:
    config = _drift_config(tmp_path, 2, [{"round": 5, "kind": "rotate"}])
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--federation.run_dir", str(tmp_path / "run")])
    assert exit_.value.code == 2
    assert "after the run's last round (federation.rounds=2)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_later_drift_list_replaces_the_earlier_one_whole(tmp_path: Path, capsys) -> None:
    # jsonargparse merges lists of classes index by index; a drift entry must not inherit fields
    # (here the shift's rotation) from the entry it replaces.
    config = _drift_config(tmp_path, 4, [{"round": 2, "kind": "rotate"}, {"round": 3, "kind": "shift", "rotation": 30}])
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(
        "data:\n  drift:\n    - {round: 2, kind: arrive, classes: [1]}\n    - {round: 4, kind: rotate}\n"
    )
    given = [{"round": 2, "kind": "arrive", "classes": [1]}, {"round": 4, "kind": "rotate"}]
    flag = "[{round: 2, kind: arrive, classes: [1]}, {round: 4, kind: rotate}]"
    for extra in (["--config", str(overlay)], ["--data.drift", flag]):
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", str(config), *extra, "--print_config"])
        assert exit_.value.code == 0
        assert yaml.safe_load(capsys.readouterr().out)["data"]["drift"] == given
    with pytest.raises(SystemExit):  # and "+" appends a change
        main(["fit", "--config", str(config), "--data.drift+", "{round: 4, kind: rotate, step: 2}", "--print_config"])
    appended = yaml.safe_load(capsys.readouterr().out)["data"]["drift"]
    assert appended[-1] == {"round": 4, "kind": "rotate", "step": 2} and len(appended) == 3
    schedule = FederatedDataModule(Synthetic(), Pathological(), drift=given).drift
    assert schedule == [Drift(round=2, kind="arrive", classes=[1]), Drift(round=4, kind="rotate")]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("{round: 3, kind: rotate, spin: 2}", r"unknown key\(s\) \['spin'\]; the keys are \['round', 'kind'"),
        ("{kind: rotate}", "round missing, e.g. {round: 6, kind: rotate}"),
    ],
)
def test_a_malformed_drift_entry_ends_in_one_line(tmp_path: Path, capsys, entry: str, message: str) -> None:
    config = _drift_config(tmp_path, 4, [])
    with pytest.raises(SystemExit) as exit_:
        main(
            ["fit", "--config", str(config), "--data.drift", f"[{entry}]", "--federation.run_dir", str(tmp_path / "r")]
        )
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and re.search(message, err)
    assert not (tmp_path / "r").exists()


def test_accuracy_by_round_averages_current_and_before_drift_over_seeds(tmp_path: Path, monkeypatch, capsys) -> None:
    root = Path(__file__).resolve().parents[1]
    # seed -> round -> (mean_acc, mean_acc_before_drift or None); round 3 is missing from seed 1
    runs = {0: {2: (0.5, None), 3: (0.2, 0.6), 4: (0.4, 0.5)}, 1: {2: (0.7, None), 4: (0.6, 0.3)}}
    for seed, by_round in runs.items():
        run = tmp_path / "grid" / f"quickstart-pfedmoe-seed{seed}"
        run.mkdir(parents=True)
        (run / "cell.json").write_text(json.dumps({"axes": {"data": "quickstart", "method": "pfedmoe"}, "seed": seed}))
        (run / "summary.json").write_text(json.dumps({"status": "completed"}))
        lines = [{"round": 1, "mean_acc": 0.1}]
        for r, (acc, before) in by_round.items():
            lines.append({"round": r, "mean_acc": acc, **({"mean_acc_before_drift": before} if before else {})})
        (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    monkeypatch.setattr("sys.argv", ["by_round.py", str(tmp_path / "grid"), "--rounds", "2", "3", "4"])
    runpy.run_path(str(root / "experiments" / "by_round.py"), run_name="__main__")
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| pfedmoe | 2 |"))

    def pm(*values: float) -> str:
        arr = np.asarray(values) * 100
        return f"{arr.mean():.1f} ± {arr.std(ddof=1) if len(arr) > 1 else 0.0:.1f}"

    expected = [pm(0.5, 0.7), f"{pm(0.2)} / {pm(0.6)}", f"{pm(0.4, 0.6)} / {pm(0.5, 0.3)}"]
    assert row.strip(" |").split(" | ")[2:] == expected


def test_the_accuracy_picture_breaks_the_before_drift_line_at_each_change(tmp_path: Path, monkeypatch) -> None:
    from fedmoe_pl.analysis import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    rows = [{"round": r, "mean_acc": 0.5} for r in range(1, 8)]
    for r in (3, 4, 6, 7):  # changes at rounds 3 and 6
        rows[r - 1]["mean_acc_before_drift"] = r / 10
    plots.plot_accuracy(rows, tmp_path, drift_rounds=[3, 6])
    lines = [line for line in figures[0].axes[0].lines if line.get_marker() == "s"]
    assert [list(line.get_xdata()) for line in lines] == [[3, 4], [6, 7]]
    assert [list(line.get_ydata()) for line in lines] == [[30.0, 40.0], [60.0, 70.0]]
    plots._pyplot().close(figures[0])
