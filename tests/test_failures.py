"""Bad input and faults: each gets a one-line error naming the value and the fix, and loses nothing.

The table holds the bad inputs: a new one is one line. Faults inside a run (a failing client, a
non-finite loss, a full disk, a corrupt file) follow it as tests of their own.
"""

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_same_run, client_states, fashion_overlay, snapshot, tiny_config, write_idx

from fedmoe_pl.cli import main
from fedmoe_pl.fleets.executor import FitJob, SequentialExecutor
from fedmoe_pl.fleets.in_process import InProcessFleet
from fedmoe_pl.run.federation import Federation


def _garbage_checkpoint(tmp: Path) -> None:
    (tmp / "old").mkdir()
    (tmp / "old" / "last.ckpt").write_bytes(b"\x80\x04not a checkpoint at all")


def _foreign_checkpoint(tmp: Path) -> None:
    (tmp / "old").mkdir()
    torch.save({"state_dict": {}, "epoch": 3}, tmp / "old" / "last.ckpt")


def _truncated_idx(tmp: Path) -> None:
    raw = tmp / "data" / "FashionMNIST" / "raw"
    write_idx(raw, n_train=40)
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])


def _truncated_system_gz(tmp: Path) -> None:
    write_idx(tmp / "system", n_train=2000, compress=True)
    gz = tmp / "system" / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:20000])


def _fashion(tmp: Path) -> list[str]:
    return ["--config", str(fashion_overlay(tmp, tmp / "data", tmp / "system"))]


# (id, extra arguments, a set-up that makes the input bad, text the one-line error must hold); exit code 2
BAD_INPUTS: list[tuple[str, Callable[[Path], list[str]], Callable[[Path], None] | None, str]] = [
    ("unknown model", lambda t: ["--client.zoo", "[cnn1, cnn7]"], None, "unknown model 'cnn7'"),
    ("participation > 1", lambda t: ["--federation.participation", "1.5"], None, "got 1.5"),
    ("participation 0", lambda t: ["--federation.participation", "0"], None, "participation (C) must lie in (0, 1]"),
    ("zero rounds", lambda t: ["--federation.rounds", "0"], None, "federation.rounds must be a positive"),
    ("nan lr", lambda t: ["--client.lr", ".nan"], None, "client.lr must be a positive number, got nan"),
    ("inf lr", lambda t: ["--client.lr", ".inf"], None, "client.lr must be a positive number, got inf"),
    ("negative momentum", lambda t: ["--client.momentum", "-0.5"], None, "client.momentum must be a non-negative"),
    ("dropout 1", lambda t: ["--federation.dropout", "1"], None, "federation.dropout is a probability in [0, 1)"),
    ("on_client_error typo", lambda t: ["--federation.on_client_error", "skip"], None, "on_client_error"),
    ("abbreviated flag", lambda t: ["--federation.round", "1"], None, "unrecognized arguments: --federation.round"),
    ("accelerator that does not exist", lambda t: ["--trainer.accelerator", "tpu"], None, "--trainer.accelerator auto"),
    ("no such checkpoint", lambda t: ["--resume", str(t / "nothing")], None, "no checkpoint at"),
    ("corrupt checkpoint", lambda t: ["--resume", str(t / "old")], _garbage_checkpoint, "it is damaged"),
    ("foreign checkpoint", lambda t: ["--resume", str(t / "old")], _foreign_checkpoint, "not a fedmoe-pl checkpoint"),
    ("missing dataset", _fashion, None, "FashionMNIST was not found under data root"),
    ("truncated dataset file", _fashion, _truncated_idx, "truncated or damaged"),
    ("truncated system package file", _fashion, _truncated_system_gz, "cannot be unpacked"),
    (
        "run directory that cannot be written",
        lambda t: ["--federation.run_dir", str(t / "tiny.yaml" / "run")],
        None,
        "cannot be written",
    ),
]
if not torch.cuda.is_available():
    BAD_INPUTS.append(("gpu on a machine without one", lambda t: ["--trainer.accelerator", "gpu"], None, "cannot run"))


@pytest.mark.parametrize(
    ("argv", "prepare", "message"), [row[1:] for row in BAD_INPUTS], ids=[r[0] for r in BAD_INPUTS]
)
def test_bad_input_gets_a_one_line_error_and_changes_nothing(tmp_path, capsys, argv, prepare, message) -> None:
    config = tiny_config(tmp_path)
    if prepare is not None:
        prepare(tmp_path)
    args = argv(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert message in err
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before  # no run directory, no stray or changed file
    assert not list(tmp_path.rglob("*.partial*"))


# -- run identity ---------------------------------------------------------------------------------


def run_fit(*argv: str) -> None:
    main(["fit", *argv])


def test_resume_continues_the_directory_it_names_not_the_configs(tmp_path, capsys) -> None:
    config = tiny_config(tmp_path, rounds=1)
    run_fit("--config", str(config), "--federation.run_dir", str(tmp_path / "a"))
    run_fit("--config", str(config), "--federation.run_dir", str(tmp_path / "b"))
    b_before = snapshot(tmp_path / "b")
    # The config names b; --resume names a: a is continued, b is not touched.
    run_fit("--config", str(config), "--federation.run_dir", str(tmp_path / "b"), "--resume", str(tmp_path / "a"))
    run_fit("--config", str(config), "--federation.rounds", "3", "--resume", str(tmp_path / "a" / "last.ckpt"))
    assert snapshot(tmp_path / "b") == b_before
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["rounds"] == 3
    assert "resuming the run in" in capsys.readouterr().err


def test_a_refused_resume_changes_nothing_and_says_why(tmp_path, capsys) -> None:
    config = tiny_config(tmp_path, rounds=2)
    run_fit("--config", str(config))
    run = tmp_path / "run"
    before = snapshot(run)
    for argv, message in (
        (["--seed_everything", "8"], "seed_everything: 7 in the run, 8 now"),
        (["--federation.rounds", "1"], "the run has completed 2 rounds, more than federation.rounds=1"),
    ):
        with pytest.raises(SystemExit) as exit_:
            run_fit("--config", str(config), "--resume", str(run), *argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
        assert snapshot(run) == before


# -- faults inside a round ------------------------------------------------------------------------


def test_a_failing_client_is_named_with_its_cause_and_the_checkpoint_stays(tmp_path, capsys) -> None:
    # A batch of one sample cannot be batch-normalized: 80 samples in batches of 79 leave one.
    config = tiny_config(tmp_path, rounds=2)
    argv = ["--config", str(config), "--data.batch_size", "79", "--algorithm.init_args.gate_norm", "batch"]
    with pytest.raises(SystemExit) as exit_:
        run_fit(*argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert "client 0 failed in round 1: ValueError: Expected more than 1 value per channel" in err
    assert "on_client_error: drop" in err and "Traceback" not in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds"] == 0 and "ValueError" in summary["reason"]
    assert torch.load(tmp_path / "run" / "last.ckpt", weights_only=False)["round"] == 0  # resumable


def _fail_in_round_2(monkeypatch, client: int) -> dict[str, dict]:
    """Make one client's local fit raise in round 2; return its state just before that fit."""
    seen: dict[str, dict] = {}
    original = SequentialExecutor._fit_one
    fits = {"n": 0}

    def fit_one(self: SequentialExecutor, job: FitJob) -> float:
        fits["n"] += 1  # 3 clients per round: the 5th fit is client 1's in round 2
        if (job.client.client_id, fits["n"]) == (client, 3 + client + 1):
            seen["before"] = {key: v.clone() for key, v in job.client.state_dict().items()}
            original(self, job)  # trains (changes the state), then fails
            raise RuntimeError("simulated device fault")
        return original(self, job)

    monkeypatch.setattr(SequentialExecutor, "_fit_one", fit_one)
    return seen


def test_drop_leaves_a_failing_client_out_of_its_round(tmp_path, capsys, monkeypatch) -> None:
    seen = _fail_in_round_2(monkeypatch, client=1)
    config = tiny_config(tmp_path, rounds=2, on_client_error="drop")
    run_fit("--config", str(config))
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["failed"] for m in metrics] == [[], [1]]
    assert [m["reported"] for m in metrics] == [3, 2]
    assert metrics[1]["total_failed"] == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["total_failed"] == 1
    client1 = client_states(run)[1]
    private = [k for k in seen["before"] if not k.startswith("moe.global_expert.")]
    assert all(torch.equal(client1[k], seen["before"][k]) for k in private)  # put back as before the fit
    # bytes up: two uploads in round 2 instead of three
    assert metrics[1]["bytes_up"] * 3 == metrics[0]["bytes_up"] * 2


def test_a_non_finite_loss_stops_naming_round_and_client_and_metrics_stay_strict_json(tmp_path, capsys) -> None:
    config = tiny_config(tmp_path, rounds=3)
    with pytest.raises(SystemExit) as exit_:
        run_fit("--config", str(config), "--client.lr", "1e12")
    err = capsys.readouterr().err
    assert exit_.value.code == 1
    assert "failed in round" in err and "FloatingPointError: the training loss is nan" in err

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    for name in ("metrics.jsonl", "summary.json"):
        text = (tmp_path / "run" / name).read_text()
        for line in text.splitlines() if name.endswith("l") else [text]:
            json.loads(line, parse_constant=refuse)


def test_dropout_is_seeded_and_the_round_aggregates_who_reported(tmp_path, capsys) -> None:
    def dropped_per_round(run: str) -> tuple[list[list[int]], list[dict]]:
        config = tiny_config(tmp_path, rounds=4, dropout=0.5)
        run_fit("--config", str(config), "--federation.run_dir", str(tmp_path / run))
        metrics = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [m["dropped"] for m in metrics], metrics

    dropped, metrics = dropped_per_round("a")
    assert dropped_per_round("b")[0] == dropped  # the same seed, the same dropouts
    assert any(dropped) and not all(len(d) == 3 for d in dropped)  # this seed gives a mixed picture
    assert all(m["reported"] + len(m["dropped"]) == 3 for m in metrics)
    per_upload = max(m["bytes_up"] // max(m["reported"], 1) for m in metrics)
    assert all(m["bytes_up"] == per_upload * m["reported"] for m in metrics)  # only reporters upload


def test_dropout_draws_at_its_rate() -> None:
    from fedmoe_pl.run.schedule import dropped_clients

    share = sum(len(dropped_clients(3, r, list(range(100)), 0.3)) for r in range(1, 51)) / 5000
    assert share == pytest.approx(0.3, abs=0.03)
    assert dropped_clients(3, 1, list(range(100)), 0.0) == set()


def test_clients_without_test_samples_are_left_out_of_the_means(tmp_path) -> None:
    from fedmoe_pl.algorithms import ClientConfig, Standalone
    from fedmoe_pl.data import IID, FederatedDataModule, Synthetic
    from fedmoe_pl.run.federation import FederationConfig

    data = FederatedDataModule(Synthetic(num_classes=2, train_per_class=24, test_per_class=8), IID(), 3, batch_size=16)
    data.setup(0)
    empty = data.clients[2]
    empty.test_images, empty.test_labels = empty.test_images[:0], empty.test_labels[:0]
    cfg = FederationConfig(rounds=1, run_dir=str(tmp_path))
    algorithm = Standalone()
    fed = Federation(cfg, algorithm, InProcessFleet(data, ClientConfig(zoo=["cnn5"]), algorithm, 0), seed=0)
    fed.run()
    record = fed.final
    assert record is not None and set(record["per_client"]["client_acc"]) == {"0", "1"}
    assert record["mean_acc"] == pytest.approx(
        (record["per_client"]["client_acc"]["0"] + record["per_client"]["client_acc"]["1"]) / 2
    )


# -- the disk fills up ----------------------------------------------------------------------------


@pytest.mark.parametrize("failing_round", [1, 2])
def test_a_full_disk_leaves_no_stray_file_and_the_run_resumes_identically(
    tmp_path, capsys, monkeypatch, failing_round
) -> None:
    import fedmoe_pl.run.rundir as rundir

    config = tiny_config(tmp_path, rounds=3)
    straight = tmp_path / "straight"
    run_fit("--config", str(config), "--federation.run_dir", str(straight))

    real_fsync, full = os.fsync, {"on": False}
    real_save = rundir.RunDirectory.save_checkpoint

    def save_checkpoint(self, state):  # the disk fills while this round's checkpoint is written
        full["on"] = full["on"] or state["round"] == failing_round
        real_save(self, state)

    def fsync(fd: int) -> None:
        if full["on"]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(rundir.RunDirectory, "save_checkpoint", save_checkpoint)
    monkeypatch.setattr(rundir.os, "fsync", fsync)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        run_fit("--config", str(config))
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and "No space left on device" in err and f"--resume {run}" in err
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert torch.load(run / "last.ckpt", weights_only=False)["round"] == failing_round - 1

    monkeypatch.undo()
    run_fit("--config", str(config), "--resume", str(run))
    assert_same_run(straight, run)


def test_a_damaged_system_archive_leaves_no_partial_file(tmp_path) -> None:
    from fedmoe_pl.data import FashionMNIST

    _truncated_system_gz(tmp_path)
    with pytest.raises(ValueError, match="cannot be unpacked"):
        FashionMNIST(root=str(tmp_path / "data"), system_dir=str(tmp_path / "system")).load()
    assert not list((tmp_path / "data").rglob("*.partial*"))
    assert not (tmp_path / "data" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()


def _always_fail(monkeypatch) -> None:
    def fit_one(self: SequentialExecutor, job: FitJob) -> float:
        raise RuntimeError("the device is gone")

    monkeypatch.setattr(SequentialExecutor, "_fit_one", fit_one)


def test_consecutive_empty_rounds_stop_the_run_as_failed(tmp_path, capsys, monkeypatch) -> None:
    """Every client dropped every round: the run must not end `completed` with untrained models."""
    _always_fail(monkeypatch)
    config = tiny_config(tmp_path, rounds=10, on_client_error="drop", max_empty_rounds=2)
    with pytest.raises(SystemExit) as exit_:
        run_fit("--config", str(config))
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert "no client reported in 2 consecutive rounds (1-2" in err
    run = tmp_path / "run"
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["round"], m["reported"], m["empty"]) for m in metrics] == [(1, 0, True), (2, 0, True)]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["rounds"] == 2
    assert "consecutive rounds" in summary["reason"] and "\n" not in summary["reason"]


def test_a_short_run_in_which_no_client_ever_reported_is_failed(tmp_path, capsys, monkeypatch) -> None:
    _always_fail(monkeypatch)
    config = tiny_config(tmp_path, rounds=1, on_client_error="drop")  # fewer rounds than max_empty_rounds
    with pytest.raises(SystemExit) as exit_:
        run_fit("--config", str(config))
    assert exit_.value.code == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "nothing was trained" in summary["reason"]


def test_an_empty_round_between_reporting_ones_is_recorded_and_the_run_completes(tmp_path, monkeypatch) -> None:
    original = SequentialExecutor._fit_one

    def fit_one(self: SequentialExecutor, job: FitJob) -> float:
        if job.seed in empty_round_seeds:
            raise RuntimeError("a flaky round")
        return original(self, job)

    from fedmoe_pl.run.schedule import fit_seed

    empty_round_seeds = {fit_seed(7, 2, cid) for cid in range(3)}  # tiny_config's seed is 7: round 2 fails
    monkeypatch.setattr(SequentialExecutor, "_fit_one", fit_one)
    run_fit("--config", str(tiny_config(tmp_path, rounds=3, on_client_error="drop")))
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["empty"] for m in metrics] == [False, True, False]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["total_reported"] == 6


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A folder with a finished one-round run (``done``), a plain file, an empty folder and a damaged grid file."""
    base = tmp_path_factory.mktemp("edge")
    config = tiny_config(base, rounds=1, run_dir=str(base / "done"))
    main(["fit", "--config", str(config)])
    (base / "afile").write_text("not a folder\n")
    (base / "empty").mkdir()
    (base / "bad_grid.yaml").write_text("base: [tiny.yaml\naxes: {\n")
    (base / "grid.yaml").write_text(yaml.safe_dump({"base": "tiny.yaml", "axes": {}}))
    return base


# Beyond fit's own table: every command, wrong types and ranges, files where folders are expected.
EDGE_INPUTS = [
    ("partition output is a file", ["partition", "--config", "{cfg}", "--output", "{b}/afile"], "is a file"),
    ("report output is a file", ["report", "{b}/done", "--output", "{b}/afile"], "is a file"),
    ("plot output under a file", ["plot", "{b}/done", "--output", "{b}/afile/pictures"], "is a file"),
    ("report of a folder without runs", ["report", "{b}/empty", "--output", "{b}/r"], "no run directory"),
    ("plot of a folder without a run", ["plot", "{b}/empty"], "has no metrics.jsonl"),
    ("plot of a missing folder", ["plot", "{b}/nowhere"], "has no metrics.jsonl"),
    ("damaged grid file", ["grid", "{b}/bad_grid.yaml", "--dry-run"], "is not valid YAML"),
    ("grid output is a file", ["grid", "{b}/grid.yaml", "--output", "{b}/afile"], "is a file"),
    ("negative seed", ["fit", "--config", "{cfg}", "--seed_everything", "-1"], "seed_everything"),
    ("negative gate lr", ["fit", "--config", "{cfg}", "--algorithm.init_args.gate_lr", "-1"], "gate_lr=-1.0"),
    ("gate norm typo", ["fit", "--config", "{cfg}", "--algorithm.init_args.gate_norm", "swich"], "swich"),
    ("float epochs", ["fit", "--config", "{cfg}", "--federation.local_epochs", "1.5"], "local_epochs"),
    ("wandb mode typo", ["fit", "--config", "{cfg}", "--wandb.mode", "onlin"], "(got 'onlin')"),
    ("zoo not a list", ["fit", "--config", "{cfg}", "--client.zoo", "cnn1"], "client.zoo"),
    ("unknown trainer key", ["fit", "--config", "{cfg}", "--trainer.profiler", "simple"], "trainer.profiler"),
    (
        "data root is a file",
        [
            "fit",
            "--config",
            "{cfg}",
            "--data.source",
            "fedmoe_pl.data.FashionMNIST",
            "--data.source.init_args.root",
            "{b}/afile",
            "--federation.run_dir",
            "{b}/new",
        ],
        "is a file",
    ),
    (
        "FML alpha above 1",
        ["fit", "--config", "{cfg}", "--algorithm", "fedmoe_pl.algorithms.FML", "--algorithm.init_args.alpha", "2"],
        "alpha=2.0",
    ),
    (
        "negative prototype weight",
        [
            "fit",
            "--config",
            "{cfg}",
            "--algorithm",
            "fedmoe_pl.algorithms.FedProto",
            "--algorithm.init_args.proto_weight",
            "-1",
        ],
        "proto_weight",
    ),
]


@pytest.mark.parametrize(("argv", "message"), [r[1:] for r in EDGE_INPUTS], ids=[r[0] for r in EDGE_INPUTS])
def test_edge_inputs_of_every_command_end_in_one_line_and_leave_a_finished_run_untouched(
    finished_run: Path, capsys, argv: list[str], message: str
) -> None:
    base = finished_run
    before = snapshot(base)
    args = [a.format(b=base, cfg=base / "tiny.yaml") for a in argv]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    assert snapshot(base) == before  # nothing written, not even an empty folder
