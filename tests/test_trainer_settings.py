"""The ``trainer`` section: only the settings a local fit honours, each working or refused up front."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_config

from fedmoe_pl.cli import build_parser, main, subcommand_parser
from fedmoe_pl.run.trainer_settings import TRAINER_KEYS


def _refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and "NestedArg" not in err and "Namespace(" not in err
    return err


def test_help_offers_only_the_trainer_settings_a_local_fit_honours(capsys) -> None:
    with pytest.raises(SystemExit):
        subcommand_parser(build_parser(), "fit").parse_args(["--help"])
    offered = {
        line.split()[0].removeprefix("--trainer.")
        for line in capsys.readouterr().out.splitlines()
        if line.strip().startswith("--trainer.")
    }
    assert offered == set(TRAINER_KEYS)
    assert {"gradient_clip_val", "accumulate_grad_batches"} <= offered


@pytest.mark.parametrize(
    "setting",
    [
        "--trainer.sync_batchnorm=true",
        "--trainer.profiler=simple",
        "--trainer.barebones=true",
        "--trainer.max_epochs=3",
    ],
)
def test_a_trainer_setting_a_local_fit_ignores_is_refused_before_anything_is_written(tmp_path, capsys, setting):
    err = _refused(["fit", "--config", str(tiny_config(tmp_path)), setting], capsys)
    assert setting.split("=")[0] in err and "--help" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("--trainer.gradient_clip_val=-1", "gradient_clip_val"),
        ("--trainer.gradient_clip_val=nan", "gradient_clip_val"),
        ("--trainer.accumulate_grad_batches=0", "accumulate_grad_batches"),
        ("--trainer.precision=17", "precision"),
        ("--trainer.limit_train_batches=1.5", "limit_train_batches"),
        ("--trainer.gradient_clip_algorithm=max", "gradient_clip_algorithm"),
        ("--algorithm.init_args.gate_norm=bogus", "bogus"),
        ("--algorithm.init_args.global_expert=cnn9", "cnn9"),
        ("--federation.rounds=x", "federation.rounds"),
    ],
)
def test_bad_values_end_in_one_line_naming_them(tmp_path, capsys, setting, named) -> None:
    err = _refused(["fit", "--config", str(tiny_config(tmp_path)), setting], capsys)
    assert named in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("policy", ["stop", "drop"])
def test_a_run_with_clipping_and_accumulation_trains_every_client(tmp_path: Path, policy: str) -> None:
    """Lightning refuses both with manual optimization; the client's step applies them instead."""
    settings = ["--trainer.gradient_clip_val=5", "--trainer.accumulate_grad_batches=2"]
    main(["fit", "--config", str(tiny_config(tmp_path, rounds=3, on_client_error=policy)), *settings])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["total_failed"] == 0
    assert summary["final_mean_acc"] > 0.5  # two classes per client: it learned


def test_fedmoe_pl_help_imports_neither_torch_nor_lightning() -> None:
    """What keeps `fedmoe-pl --help` (and grid/report/plot --help) under a second or two."""
    code = (
        "import sys\nfrom fedmoe_pl.cli import main\n"
        "for argv in (['--help'], ['grid', '--help'], ['report', '--help'], ['plot', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit as stop:\n        assert stop.code == 0, stop.code\n"
        "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize(
    "setting", ["--trainer.precision=bf16-mixed", "--trainer.gradient_clip_val=1", "--trainer.limit_train_batches=2"]
)
def test_a_result_changing_trainer_setting_is_refused_on_resume(tmp_path: Path, capsys, setting: str) -> None:
    from helpers import snapshot

    config = tiny_config(tmp_path, rounds=1)
    main(["fit", "--config", str(config)])
    before = snapshot(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", str(config), "--federation.rounds=2", "--resume", str(tmp_path / "run"), setting])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "refusing to resume" in err and setting.removeprefix("--").split("=")[0] in err
    assert snapshot(tmp_path) == before


def test_the_accelerator_may_change_on_resume(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, rounds=1)
    main(["fit", "--config", str(config)])
    main(
        [
            "fit",
            "--config",
            str(config),
            "--federation.rounds=2",
            "--resume",
            str(tmp_path / "run"),
            "--trainer.accelerator=auto",
        ]
    )
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"] == 2
