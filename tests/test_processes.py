"""Runs as a scheduler sees them: stop signals, exit codes, and runs that start together."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_same_run, fashion_overlay, overlay, tiny_config, write_idx

from fedmoe_pl.cli import main
from fedmoe_pl.errors import Interrupted
from fedmoe_pl.fleets.clients import ClientFiles
from fedmoe_pl.run.signals import StopSignals, stop_behind


def test_a_signal_during_abandonable_work_interrupts_it_at_once() -> None:
    with StopSignals() as signals, pytest.raises(Interrupted) as stop, signals.abandonable():
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(5)  # not reached: the handler raises
    assert stop.value.name == "SIGUSR1" and stop.value.exit_code == 128 + signal.SIGUSR1


def test_a_signal_during_a_write_waits_for_it_to_finish() -> None:
    written = []
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)  # outside abandonable work: only noted
        written.append("checkpoint")
        with pytest.raises(Interrupted) as stop:
            signals.check()
    assert written == ["checkpoint"] and stop.value.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the old handler is back


def test_a_signal_during_a_client_file_write_inside_abandonable_work_waits_for_the_file(tmp_path, monkeypatch) -> None:
    # A signal inside torch.save used to raise from the middle of it; torch's clean-up then failed
    # and hid the stop behind a RuntimeError, and a stopped run ended as failed.
    real_save = torch.save

    def save_with_a_signal(obj, fh):
        os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode: inside the write
        real_save(obj, fh)

    monkeypatch.setattr(torch, "save", save_with_a_signal)
    files = ClientFiles(tmp_path)
    state = {"w": torch.arange(100_000, dtype=torch.float32)}
    with StopSignals(final=(signal.SIGTERM,)) as signals, pytest.raises(Interrupted) as stop, signals.abandonable():
        files.write(3, 2, state)
        time.sleep(5)  # not reached: the stop is raised once the file is whole
    assert stop.value.final and stop.value.name == "SIGTERM"
    assert torch.equal(torch.load(tmp_path / "3.r2.pt")["w"], state["w"]) and files.version == {3: 2}
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_stop_that_surfaced_as_another_error_is_still_found() -> None:
    stop = Interrupted(signal.SIGTERM, final=True)
    try:
        try:
            raise stop
        except Interrupted:
            raise RuntimeError("a library's clean-up failed") from None
    except RuntimeError as err:
        assert stop_behind(err) is stop  # `from None` hides the context from tracebacks, not from __context__
    assert stop_behind(ValueError("plain")) is None


def _fit_command(*argv: str) -> list[str]:
    return [sys.executable, "-m", "fedmoe_pl.cli", "fit", *argv]


def _env() -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    return env


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_sigterm_mid_round_exits_non_zero_and_the_resumed_run_equals_an_uninterrupted_one(tmp_path, capsys) -> None:
    # Rounds of about a second (more data, three local epochs), so that the signal lands inside one.
    slow = overlay(tmp_path, "slow", {"data": {"source": {"init_args": {"train_per_class": 300}}}})
    config = tiny_config(tmp_path, rounds=4, local_epochs=3)
    argv = ["--config", str(config), "--config", str(slow)]
    run = tmp_path / "run"
    proc = subprocess.Popen(_fit_command(*argv), env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not _metrics(run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into round 2's local fits
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)

    assert proc.returncode == 128 + signal.SIGTERM, err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["reason"] == "SIGTERM"
    done = summary["rounds"]
    assert 1 <= done < 4 and [m["round"] for m in _metrics(run)] == list(range(1, done + 1))
    assert torch.load(run / "last.ckpt", weights_only=False)["round"] == done
    assert f"interrupted by SIGTERM after round {done}" in err and f"--resume {run}" in err

    main(["fit", *argv, "--resume", str(run)])
    straight = tmp_path / "straight"
    main(["fit", *argv, "--federation.run_dir", str(straight)])
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert_same_run(straight, run)


@pytest.mark.slow
def test_four_runs_started_at_once_on_a_fresh_data_root_all_finish(tmp_path) -> None:
    # Fashion-MNIST from a "system package" folder: each run finds the data root empty and would
    # unpack the same files; the data root's lock makes that happen once.
    write_idx(tmp_path / "system", n_train=6000, n_test=500, compress=True)
    config = tiny_config(tmp_path, rounds=1)
    fashion = fashion_overlay(tmp_path, tmp_path / "data", tmp_path / "system")
    procs = [
        subprocess.Popen(
            _fit_command(
                "--config", str(config), "--config", str(fashion), "--federation.run_dir", str(tmp_path / f"runs/{i}")
            ),
            env=_env(),
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    results = [(p.wait(timeout=300), p.stderr.read() if p.stderr else "") for p in procs]
    assert [code for code, _ in results] == [0, 0, 0, 0], results
    fingerprints = {
        json.loads((tmp_path / f"runs/{i}/summary.json").read_text())["partition_fingerprint"] for i in range(4)
    }
    assert len(fingerprints) == 1
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "train-images-idx3-ubyte", "train-labels-idx1-ubyte"]
    )


def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path, capsys) -> None:
    from fedmoe_pl.run.rundir import RunDirectory

    config = tiny_config(tmp_path, rounds=1)
    holder = RunDirectory(tmp_path / "run")
    holder.acquire()  # another process's lock, as far as the run below can tell
    try:
        with pytest.raises(SystemExit) as exit_:
            main(["fit", "--config", str(config)])
    finally:
        holder.release()
    assert exit_.value.code == 1 and "is in use by another running process" in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.yaml").exists()
