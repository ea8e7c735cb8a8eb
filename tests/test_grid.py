"""The grid command: the paper's grid as cells, grid-file errors, the local launcher, the sbatch script."""

from __future__ import annotations

import json
import os
import re
import stat
from collections import Counter
from pathlib import Path

import pytest
import yaml
from helpers import assert_same_run, snapshot, tiny_config

from fedmoe_pl.cli import build_parser, main, subcommand_parser
from fedmoe_pl.cluster.grid import Grid, run_local
from fedmoe_pl.cluster.slurm import array_spec, requeue_self, sbatch_script

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "configs" / "grids" / "paper.yaml"
METHODS = sorted(p.stem for p in (ROOT / "configs" / "methods").glob("*.yaml"))
# Methods whose overlay sets its own (homogeneous) zoo: FedAvg, FedPer, FedRep.
OWN_ZOO = {
    m
    for m in METHODS
    if "zoo" in (yaml.safe_load((ROOT / "configs" / "methods" / f"{m}.yaml").read_text()).get("client") or {})
}
# The paper's grid (reference protocol): dataset -> (source, classes per client); scale -> (N, C); zoo.
DATASETS = {"cifar10": ("CIFAR10", 2), "cifar100": ("CIFAR100", 10)}
SCALES = {"n10": (10, 1.0), "n50": (50, 0.2), "n100": (100, 0.1)}
ZOOS = {"hetero": ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"], "homo": ["cnn1"]}
SEEDS = (0, 1, 2)


def test_dry_run_of_the_paper_grid_lists_every_cell_once(capsys) -> None:
    main(["grid", str(PAPER), "--dry-run"])
    out = capsys.readouterr()
    lines = out.out.splitlines()
    # FedAvg (and FedPer, FedRep) run once per homogeneous setting: their overlays set the CNN-1 zoo, so
    # their "hetero" cells would repeat the "homo" ones under the wrong label.
    assert {"fedavg", "fedper", "fedrep"} <= OWN_ZOO
    assert lines[0] == f"{2 * 3 * 2 * len(METHODS) * 3 - 2 * 3 * 3 * len(OWN_ZOO)} cells"
    names = Counter(line.split()[1] for line in lines[1:])
    expected = {
        f"{d}-{s}-{z}-{m}-seed{k}"
        for d in DATASETS
        for s in SCALES
        for z in ZOOS
        for m in METHODS
        for k in SEEDS
        if not (m in OWN_ZOO and z == "hetero")
    }
    assert set(names) == expected and set(names.values()) == {1}
    assert f"{18 * len(OWN_ZOO)} cells resolve to the same run config" in out.err
    assert "cifar10-n10-hetero-fedavg-seed0 = cifar10-n10-homo-fedavg-seed0" in out.err
    for line in lines[1:]:
        assert "--seed_everything=" in line and "--federation.run_dir=runs/grids/paper/" in line


def _paper_cells():
    return [c for c in Grid.load(PAPER).cells() if c.seed == 0]


@pytest.mark.parametrize("cell", _paper_cells(), ids=lambda c: c.name.removesuffix("-seed0"))
def test_every_cell_of_the_paper_grid_builds(cell) -> None:
    parser = subcommand_parser(build_parser(), "fit")
    args = cell.fit_args(resume=False)
    init = parser.instantiate(parser.parse_args(args))
    init.algorithm.check(init.client)  # the method's own check of the setting
    axes = cell.axes
    source, classes = DATASETS[axes["dataset"]]
    assert type(init.data.source).__name__ == source
    assert init.data.partitioner.classes_per_client == classes
    assert (init.data.num_clients, init.federation.participation) == SCALES[axes["scale"]]
    # FedAvg, FedPer, FedRep: one model, whatever the zoo axis says (those cells are left out when run)
    assert init.client.zoo == (["cnn1"] if axes["method"] in OWN_ZOO else ZOOS[axes["zoo"]])
    assert (init.federation.rounds, init.client.lr, init.data.batch_size, init.data.split) == (500, 0.01, 64, "paper")
    overlay = yaml.safe_load((ROOT / "configs" / "methods" / f"{axes['method']}.yaml").read_text())
    assert type(init.algorithm).__name__ == overlay["algorithm"]["class_path"].rsplit(".", 1)[1]
    assert init.federation.run_dir == cell.run_dir and init.seed_everything == 0


def _grid_file(tmp_path: Path, body: dict) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"base": ["nope.yaml"], "axes": {}}, "'nope.yaml'"),
        ({"axes": {"m": "methods/*.yaml"}}, "glob 'methods/*.yaml' matches no file"),
        ({"axes": {"m": {"a b": "tiny.yaml"}}}, "value 'a b'"),
        ({"axes": {}, "seeds": [1, 1]}, "without repeats"),
        ({"axes": {}, "slurm": {"gpu": 1}}, "slurm section"),
        ({"axis": {}}, "unknown keys ['axis']"),
        ({"axes": {"n": {"x": {"algorithm init": 1}}}}, "sets 'algorithm init'; a setting is a dotted key"),
    ],
)
def test_a_bad_grid_file_is_refused_naming_what_is_wrong(tmp_path: Path, capsys, body, message) -> None:
    tiny_config(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["grid", str(_grid_file(tmp_path, body)), "--dry-run"])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmoe-pl grid: error: ") and message in err


def test_cells_compose_base_then_axis_overlays_in_order(tmp_path: Path) -> None:
    tiny = tiny_config(tmp_path)
    (tmp_path / "a.yaml").write_text("client: {lr: 0.1}\n")
    (tmp_path / "b.yaml").write_text("client: {lr: 0.2}\n")
    grid = Grid.load(_grid_file(tmp_path, {"base": "tiny.yaml", "axes": {"lr": {"hi": ["a.yaml", "b.yaml"]}}}))
    (cell,) = grid.cells()
    assert cell.configs == [str(tiny), str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")]
    assert (cell.name, cell.axes, cell.run_dir) == ("hi-seed0", {"lr": "hi"}, str(Path("runs/grids/grid/hi-seed0")))


@pytest.mark.slow
def test_local_grid_runs_new_cells_resumes_started_ones_and_skips_finished_ones(tmp_path: Path, capsys) -> None:
    tiny_config(tmp_path)
    (tmp_path / "moe.yaml").write_text("algorithm: {class_path: fedmoe_pl.algorithms.PFedMoE}\n")
    (tmp_path / "alone.yaml").write_text("algorithm: {class_path: fedmoe_pl.algorithms.Standalone}\n")
    grid_file = _grid_file(
        tmp_path,
        {
            "base": "tiny.yaml",
            "axes": {"method": {"moe": "moe.yaml", "alone": "alone.yaml"}},
            "seeds": [7],
            "args": ["--federation.rounds", "3"],
            "output": str(tmp_path / "out"),
        },
    )
    cells = {c.axes["method"]: c for c in Grid.load(grid_file).cells()}
    moe, alone = cells["moe"], cells["alone"]
    # `alone` was interrupted after round 1: a checkpoint and an interrupted summary.
    main(["fit", *alone.fit_args(), "--federation.rounds", "1"])
    summary = json.loads((Path(alone.run_dir) / "summary.json").read_text())
    (Path(alone.run_dir) / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    assert (moe.status(), alone.status()) == ("new", "started")

    assert run_local([moe, alone]) == 0
    assert (moe.status(), alone.status()) == ("finished", "finished")
    reference = tmp_path / "reference"
    configs = [a for c in alone.configs for a in ("--config", c)]
    main(
        ["fit", *configs, "--seed_everything", "7", "--federation.rounds", "3", "--federation.run_dir", f"{reference}"]
    )
    assert_same_run(Path(alone.run_dir), reference)
    assert json.loads((Path(moe.run_dir) / "cell.json").read_text())["axes"] == {"method": "moe"}

    before = snapshot(tmp_path / "out")
    capsys.readouterr()
    assert run_local([moe, alone]) == 0
    assert capsys.readouterr().out.count("finished, skipped") == 2
    assert snapshot(tmp_path / "out") == before


def test_array_spec_compresses_indices_into_ranges() -> None:
    assert array_spec([7, 0, 1, 2, 5, 8], throttle=4) == "0-2,5,7-8%4"
    assert array_spec([3], throttle=0) == "3"


def test_sbatch_script_requeues_on_usr1_and_takes_the_flags(tmp_path: Path, capsys) -> None:
    tiny_config(tmp_path)
    grid_file = _grid_file(
        tmp_path,
        {"base": "tiny.yaml", "axes": {}, "seeds": [0, 1, 2], "slurm": {"gpus": 2, "time": "10:00", "throttle": 5}},
    )
    main(["grid", str(grid_file), "--launcher", "slurm", "--dry-run", "--partition", "gpu", "--throttle", "2"])
    out = capsys.readouterr().out
    for line in (
        "#SBATCH --array=0-2%2",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=10:00",
        "#SBATCH --gres=gpu:2",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=USR1@120",
    ):
        assert line in out.splitlines()
    assert (
        "srun --ntasks=1" in out
        and "-m fedmoe_pl.cluster.slurm" in out
        and out.rstrip().endswith("$SLURM_ARRAY_TASK_ID")
    )
    grid = Grid.load(grid_file)
    script = sbatch_script(grid, grid.slurm, tmp_path / "m" / "cells.json", [1], tmp_path)
    assert "--account" not in script and "#SBATCH --array=1%5" in script


def test_every_slurm_option_of_a_grid_file_is_also_a_flag(tmp_path: Path, capsys) -> None:
    from dataclasses import fields

    from fedmoe_pl.cli import build_parser
    from fedmoe_pl.cluster.grid import SlurmOptions

    grid_parser = build_parser()._subcommands_action._name_parser_map["grid"]
    flags = {opt for action in grid_parser._actions for opt in action.option_strings}
    assert {f"--{option.name}" for option in fields(SlurmOptions)} <= flags
    tiny_config(tmp_path)
    grid_file = _grid_file(tmp_path, {"base": "tiny.yaml", "axes": {}, "seeds": [0], "slurm": {"mem": "4G"}})
    argv = ["--mem", "16G", "--cpus_per_task", "6", "--signal_lead_s", "300", "--extra", '["--qos=long"]']
    main(["grid", str(grid_file), "--launcher", "slurm", "--dry-run", *argv])
    lines = capsys.readouterr().out.splitlines()
    for line in ("#SBATCH --mem=16G", "#SBATCH --cpus-per-task=6", "#SBATCH --signal=USR1@300", "#SBATCH --qos=long"):
        assert line in lines


def test_requeue_self_names_the_array_task(tmp_path: Path, monkeypatch) -> None:
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "called"}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert requeue_self()
    assert (tmp_path / "called").read_text().split() == ["requeue", "12_3"]
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert requeue_self() and (tmp_path / "called").read_text().split() == ["requeue", "40"]


@pytest.mark.parametrize("grid_file", sorted((ROOT / "configs" / "grids").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_cell_of_every_shipped_grid_parses(grid_file: Path) -> None:
    parser = subcommand_parser(build_parser(), "fit")
    cells = Grid.load(grid_file).cells()
    assert len({c.run_dir for c in cells}) == len(cells)  # no two cells share a run directory
    for cell in cells:
        if cell.seed == cells[0].seed:
            cfg = parser.parse_args(cell.fit_args(resume=False))
            assert cfg.federation.run_dir == cell.run_dir and cfg.wandb.name == cell.name


@pytest.mark.slow
def test_local_grid_goes_on_past_a_failing_cell_and_names_it(tmp_path: Path, capsys) -> None:
    tiny_config(tmp_path)
    (tmp_path / "bad.yaml").write_text("client: {lr: .nan}\n")  # refused before training (exit 2)
    (tmp_path / "good.yaml").write_text("client: {lr: 0.05}\n")
    grid_file = _grid_file(
        tmp_path,
        {
            "base": "tiny.yaml",
            "axes": {"lr": {"bad": "bad.yaml", "good": "good.yaml"}},
            "args": ["--federation.rounds=1"],
            "output": str(tmp_path / "out"),
        },
    )
    with pytest.raises(SystemExit) as done:
        main(["grid", str(grid_file)])
    assert done.value.code == 1
    assert "1 of 2 cells failed: bad-seed0" in capsys.readouterr().err
    assert [c.status() for c in Grid.load(grid_file).cells()] == ["new", "finished"]


def test_inside_a_slurm_job_the_client_trainers_leave_requeueing_to_the_federation(tmp_path: Path, monkeypatch) -> None:
    import lightning as L

    from fedmoe_pl.cli import _experiment
    from fedmoe_pl.fleets.executor import FitJob, SequentialExecutor
    from fedmoe_pl.run.experiment import build_federation

    for key, value in (("SLURM_NTASKS", "1"), ("SLURM_JOB_NAME", "fedmoe-t"), ("SLURM_JOB_ID", "5")):
        monkeypatch.setenv(key, value)
    seen = []
    monkeypatch.setattr(L.Trainer, "fit", lambda trainer, *a, **k: seen.append(trainer))
    parser = subcommand_parser(build_parser(), "fit")
    exp = _experiment(parser, parser.parse_args(["--config", str(tiny_config(tmp_path))]))
    exp.data.setup(exp.seed)
    client = build_federation(exp).fleet.pool[0]  # type: ignore[attr-defined]
    list(SequentialExecutor({"accelerator": "cpu"}).fit([FitJob(client, exp.data.clients[0], seed=1, epochs=1)]))
    environment = seen[0]._accelerator_connector.cluster_environment
    assert type(environment).__name__ == "SLURMEnvironment" and environment.auto_requeue is False
    # Lightning's own choice here would save and requeue a single local fit on SIGUSR1.
    assert L.Trainer(accelerator="cpu", logger=False)._accelerator_connector.cluster_environment.auto_requeue


def test_cells_that_resolve_to_the_same_run_are_run_once_under_the_later_label(tmp_path: Path, capsys) -> None:
    tiny_config(tmp_path)  # client.lr 0.05
    (tmp_path / "a.yaml").write_text("client: {lr: 0.1}\n")
    (tmp_path / "same.yaml").write_text("client: {lr: 0.05}\n")
    axes = {"lr": {"x": "same.yaml", "a": "a.yaml", "base": "tiny.yaml"}}
    main(["grid", str(_grid_file(tmp_path, {"base": "tiny.yaml", "axes": axes})), "--dry-run"])
    out = capsys.readouterr()
    assert out.out.splitlines()[0] == "2 cells"
    # The file lists the values a, base, x (sorted by safe_dump): of base and x, the later one runs.
    assert [line.split()[1] for line in out.out.splitlines()[1:]] == ["a-seed0", "x-seed0"]
    assert "1 cells resolve to the same run config" in out.err and "base-seed0 = x-seed0" in out.err


def test_a_grid_cell_whose_overlay_does_not_parse_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    tiny_config(tmp_path)
    (tmp_path / "bad.yaml").write_text("client: {lr: fast}\n")
    with pytest.raises(SystemExit) as done:
        main(
            ["grid", str(_grid_file(tmp_path, {"base": "tiny.yaml", "axes": {"lr": {"bad": "bad.yaml"}}})), "--dry-run"]
        )
    assert done.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad-seed0" in err and "fast" in err


def test_an_axis_of_settings_passes_them_after_the_grid_args_and_the_gate_ablation_covers_its_grid() -> None:
    grid = Grid.load(ROOT / "configs" / "grids" / "gate_ablation.yaml")
    cells = grid.cells()
    assert len(cells) == 2 * 4 * 3 * 3
    parser = subcommand_parser(build_parser(), "fit")
    seen = set()
    for cell in cells:
        if cell.seed != 0:
            continue
        cfg = parser.parse_args(cell.fit_args(resume=False))
        norm, hidden = cell.axes["norm"], int(cell.axes["hidden"].removeprefix("h"))
        assert cfg.algorithm.init_args.gate_norm == norm and cfg.algorithm.init_args.gate_hidden == hidden
        assert cfg.federation.rounds == 10
        assert cell.args[0] == "--federation.rounds=10" and cell.args[1].startswith("--algorithm.init_args.gate_norm=")
        seen.add((cell.axes["data"], norm, hidden))
    assert seen == {
        (d, n, h)
        for d in ("quickstart", "cifar10_sample")
        for n in ("switch", "batch", "layer", "none")
        for h in (16, 64, 256)
    }


def test_a_value_may_mix_overlays_and_settings_as_the_heart_disease_grid_does() -> None:
    grid = Grid.load(ROOT / "configs" / "grids" / "heart_disease.yaml")
    cells = {c.name: c for c in grid.cells()}
    assert len(cells) == 12 * 3
    fedavg, fml = cells["fedavg-seed0"], cells["fml-seed0"]
    assert fedavg.configs[-1].endswith("fedavg.yaml") and fedavg.args == ['--client.zoo=["mlp1"]']
    parser = subcommand_parser(build_parser(), "fit")
    cfg = parser.parse_args(fedavg.fit_args(resume=False))
    assert cfg.client.zoo == ["mlp1"] and cfg.algorithm.class_path.endswith("FedAvg")
    assert parser.parse_args(fml.fit_args(resume=False)).client.zoo == ["mlp1", "mlp2", "mlp3", "mlp4"]


def test_only_runs_a_slice_of_the_grid_and_names_what_it_does_not_know(tmp_path: Path, capsys) -> None:
    from fedmoe_pl.cluster.grid import select

    cells = Grid.load(ROOT / "configs" / "grids" / "gate_ablation.yaml").cells()
    picked = select(cells, ["hidden=h64", "data=quickstart", "seed=0,2"])
    assert [c.name for c in picked] == [
        f"quickstart-{n}-h64-seed{s}" for n in ("switch", "batch", "layer", "none") for s in (0, 2)
    ]
    assert select(cells, ["norm=layer", "norm=none"]) == [c for c in cells if c.axes["norm"] in ("layer", "none")]
    refused = {
        "width=3": "no axis 'width'; its axes are ['data', 'hidden', 'norm', 'seed']",
        "hidden=h65": "axis 'hidden' has no value ['h65']",
        "hidden": "give AXIS=VALUE",
    }
    for only, message in refused.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            select(cells, [only])
    grid = str(ROOT / "configs" / "grids" / "gate_ablation.yaml")
    code = main(["grid", grid, "--dry-run", "--only", "norm=none", "seed=1", "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code in (0, None) and out.startswith("6 cells") and "none-h16-seed1" in out and "switch" not in out
