"""Tabular data: the Heart Disease source (files in the UCI format), the Natural partition, the
standardization, the MLP zoo, and federations of table rows end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fedmoe_pl.algorithms import ClientConfig, ClientContext, PFedMoE
from fedmoe_pl.analysis.evaluation import summarize
from fedmoe_pl.cli import main
from fedmoe_pl.data import FederatedDataModule, HeartDisease, Natural, Pathological, Source, SourceData, Synthetic
from fedmoe_pl.data.inputs import ImageInput, TabularInput
from fedmoe_pl.data.tabular import HOSPITALS, parse_hospital
from fedmoe_pl.data.transforms import FeatureTransform
from fedmoe_pl.models import MLP_SHAPES, available_models, build_model, contract_gaps

ROOT = Path(__file__).resolve().parents[1]
COUNTS = {"processed.cleveland.data": 303, "processed.hungarian.data": 294, "processed.switzerland.data": 123,
          "processed.va.data": 200}  # fmt: skip


def write_hospitals(folder: Path, counts: dict[str, int] = COUNTS, seed: int = 0) -> None:
    """Files in the UCI 'processed' format: 13 features and num per line, '?' where missing; the
    label depends on two features so that a model can learn it."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for site, (name, n) in enumerate(counts.items()):
        lines = []
        for _ in range(n):
            age, chol, thalach = rng.integers(30, 77), rng.integers(120, 400), rng.integers(80, 200)
            sick = (age > 55) + (thalach < 140) >= 1
            values = [age, rng.integers(0, 2), rng.integers(1, 5), rng.integers(95, 180), chol, rng.integers(0, 2),
                      rng.integers(0, 3), thalach, rng.integers(0, 2), round(float(rng.uniform(0, 4)), 1),
                      rng.integers(1, 4), rng.integers(0, 4), rng.choice([3, 6, 7])]  # fmt: skip
            fields = [str(v) for v in values] + [str(int(rng.integers(1, 5)) if sick else 0)]
            if site == 2:  # Switzerland: cholesterol recorded as 0, ca missing
                fields[4], fields[11] = "0", "?"
            if rng.random() < 0.1:
                fields[10] = "?"
            lines.append(",".join(fields))
        (folder / name).write_text("\n".join(lines) + "\n")


def test_the_four_files_parse_to_their_documented_counts_with_missing_values_as_nan(tmp_path) -> None:
    write_hospitals(tmp_path / "heart-disease")
    data = HeartDisease(root=str(tmp_path)).load()
    assert data.sites == ["Cleveland", "Hungary", "Switzerland", "Long Beach VA"]
    per_site = np.bincount(data.train_sites, minlength=4) + np.bincount(data.test_sites, minlength=4)
    assert per_site.tolist() == [303, 294, 123, 200] and len(data.train_labels) + len(data.test_labels) == 920
    assert data.sample == TabularInput(26) and data.num_classes == 2 and data.classes == ["no disease", "disease"]
    swiss = data.train_images[torch.from_numpy(data.train_sites == 2)]
    assert torch.isnan(swiss[:, 4]).all() and torch.isnan(swiss[:, 11]).all()  # chol 0 and '?' are missing
    assert (swiss[:, 13 + 4] == 1).all() and (swiss[:, 13 + 11] == 1).all()  # their indicators
    cleveland = data.train_images[torch.from_numpy(data.train_sites == 0)]
    assert not torch.isnan(cleveland[:, :4]).any() and (cleveland[:, 13:17] == 0).all()
    # Each hospital's labels split a third to test, per label.
    for site in range(4):
        for label in (0, 1):
            train = int(((data.train_sites == site) & (data.train_labels.numpy() == label)).sum())
            test = int(((data.test_sites == site) & (data.test_labels.numpy() == label)).sum())
            assert test == round((train + test) / 3)


def test_the_split_is_the_sources_own_and_options_change_the_inputs(tmp_path) -> None:
    write_hospitals(tmp_path)  # the files directly under the root work too
    a, b = HeartDisease(root=str(tmp_path)).load(), HeartDisease(root=str(tmp_path)).load()
    assert torch.equal(a.test_labels, b.test_labels) and a.identity == b.identity
    other = HeartDisease(root=str(tmp_path), split_seed=1).load()
    assert other.identity != a.identity
    plain = HeartDisease(root=str(tmp_path), missing_indicators=False, binary=False).load()
    assert plain.sample == TabularInput(13) and plain.num_classes == 5 and int(plain.train_labels.max()) == 4


def test_a_missing_or_damaged_hospital_file_is_named(tmp_path) -> None:
    write_hospitals(tmp_path / "heart-disease")
    (tmp_path / "heart-disease" / "processed.va.data").unlink()
    with pytest.raises(FileNotFoundError, match=r"processed\.va\.data not found.*download is off"):
        HeartDisease(root=str(tmp_path)).load()
    write_hospitals(tmp_path / "heart-disease")
    path = tmp_path / "heart-disease" / "processed.hungarian.data"
    lines = path.read_text().splitlines()
    lines[6] = lines[6].rsplit(",", 1)[0]  # 13 values
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r"processed\.hungarian\.data:7: 13 comma-separated values"):
        parse_hospital(path)
    lines[6] = lines[5].replace(",", ",abc,", 1).rsplit(",", 1)[0]
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r":7: 'abc' is neither a number nor '\?'"):
        parse_hospital(path)
    lines[6] = lines[5].replace(",", ",nan,", 1).rsplit(",", 1)[0]  # parses as a float, is not a value
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match=r":7: 'nan' is neither a number nor '\?'"):
        parse_hospital(path)


class Rows(Source):
    """Two sites of given rows (N, F), labels alternating."""

    def __init__(self, train: torch.Tensor, test: torch.Tensor) -> None:
        self.train, self.test = train, test

    def load(self) -> SourceData:
        labels = lambda n: torch.arange(n) % 2  # noqa: E731
        sites = lambda n: (np.arange(n) >= n // 2).astype(np.int64)  # noqa: E731
        return SourceData(self.train, labels(len(self.train)), self.test, labels(len(self.test)), 2, "rows",
                          inputs=TabularInput(self.train.shape[1]), train_sites=sites(len(self.train)),
                          test_sites=sites(len(self.test)), sites=["a", "b"])  # fmt: skip


def test_standardization_uses_the_training_rows_only_and_fills_missing_values_with_their_mean() -> None:
    train = torch.tensor([[1.0, 5.0, math.nan], [3.0, 5.0, 2.0], [5.0, 5.0, 4.0], [7.0, 5.0, math.nan]])
    test = torch.tensor([[4.0, 6.0, math.nan], [1000.0, -9.0, 3.0]])
    dm = FederatedDataModule(Rows(train, test), Natural(), 2, batch_size=8)
    dm.setup(0)
    assert dm.sites == ["a", "b"] and dm.clients[0].num_train == 2 and dm.clients[1].num_test == 1
    # mean (4, 5, 3), std (sqrt 5, 0 -> 1, 1): the test rows' 1000 changes nothing.
    x, _ = next(iter(dm.clients[0].eval_batches()))
    assert x[0].tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-6) and len(x) == 1
    rows, _ = next(iter(dm.clients[0].train_batches()))
    assert sorted(rows[:, 0].tolist()) == pytest.approx([-3 / math.sqrt(5), -1 / math.sqrt(5)])
    assert sorted(rows[:, 2].tolist()) == pytest.approx([-1.0, 0.0])  # the missing value is the mean, 0
    other = FederatedDataModule(Rows(train, test * 7), Natural(), 2, batch_size=8)
    other.setup(0)
    assert torch.equal(other.clients[0].train_transform.mean, dm.clients[0].train_transform.mean)


def test_image_augmentation_is_refused_on_rows() -> None:
    rows = torch.ones(4, 3)
    with pytest.raises(ValueError, match=r"data.augment=true crops and flips images, but the data gives tabular rows"):
        FederatedDataModule(Rows(rows, rows), Natural(), 2, augment=True).setup(0)
    FederatedDataModule(Rows(rows, rows), Natural(), 2, augment=False).setup(0)  # off is fine


def test_feature_statistics_leave_out_missing_values() -> None:
    fitted = FeatureTransform.fit(torch.tensor([[1.0, math.nan], [3.0, math.nan]]))
    assert fitted.mean.tolist() == [[2.0, 0.0]] and fitted.std.tolist() == [[1.0, 1.0]]
    assert fitted(torch.tensor([[math.nan, 4.0]])).tolist() == [[0.0, 4.0]]


def test_the_natural_partition_is_refused_where_it_cannot_follow_sites() -> None:
    rows = Rows(torch.zeros(4, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"has 2 \(a, b\), but num_clients=3; set data.num_clients: 2"):
        FederatedDataModule(rows, Natural(), 3).setup(0)
    with pytest.raises(ValueError, match="Synthetic has no sites; use Pathological"):
        FederatedDataModule(Synthetic(num_classes=4, train_per_class=5), Natural(), 2).setup(0)


def test_the_usual_partitioners_work_on_the_pooled_rows(tmp_path) -> None:
    write_hospitals(tmp_path)
    dm = FederatedDataModule(HeartDisease(root=str(tmp_path)), Pathological(1), 4, split="pooled")
    dm.setup(3)
    held = [set(c["train"]) for c in dm.report()["clients"]]
    assert held == [{"0"}, {"1"}, {"0"}, {"1"}]
    natural = FederatedDataModule(HeartDisease(root=str(tmp_path)), Natural(), 4, split="pooled")
    natural.setup(3)
    assert [natural.sizes(i)[0] + natural.sizes(i)[1] for i in range(4)] == [303, 294, 123, 200]
    assert [c["site"] for c in natural.report()["clients"]] == ["Cleveland", "Hungary", "Switzerland", "Long Beach VA"]


@pytest.mark.parametrize("name", sorted(MLP_SHAPES))
def test_every_mlp_keeps_the_zoo_contract(name: str) -> None:
    model = build_model(name, num_classes=3, inputs=TabularInput(26))
    assert contract_gaps(model) == [] and model.feature_dim == 64
    x = torch.randn(5, 26)
    assert model.forward_features(x).shape == (5, 64) and model(x).shape == (5, 3)


def test_the_mlps_differ_in_size_from_the_largest_to_the_smallest() -> None:
    sizes = [sum(p.numel() for p in build_model(n, inputs=TabularInput(26)).parameters()) for n in sorted(MLP_SHAPES)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == 5


def test_a_model_for_another_kind_of_input_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"model 'cnn1' reads image inputs but the data gives tabular rows of 26"):
        build_model("cnn1", inputs=TabularInput(26))
    with pytest.raises(ValueError, match=r"'mlp1' reads tabular inputs .* 1x16x16 images; use one of \['cnn1'"):
        build_model("mlp1", 1, 16, 4)
    assert available_models("tabular") == ["mlp1", "mlp2", "mlp3", "mlp4", "mlp5"]


def test_pfedmoe_on_rows_mixes_mlps_and_its_gate_reads_the_row() -> None:
    ctx = ClientContext(0, "mlp2", 0, 0, 2, ClientConfig(zoo=["mlp2"]), inputs=TabularInput(26))
    client = PFedMoE().build_client(ctx)
    assert client.moe.gate.net[0].in_features == 26
    assert type(client.moe.global_expert).__name__ == "MLPExtractor"  # MLP-5's, the default on rows
    assert sum(p.numel() for p in client.moe.global_expert.parameters()) == 26 * 64 + 64 + 64 * 64 + 64
    logits = client(torch.randn(4, 26))
    assert logits.shape == (4, 2)
    image_ctx = ClientContext(0, "cnn1", 1, 16, 2, ClientConfig(zoo=["cnn1"]))
    assert image_ctx.inputs == ImageInput(1, 16)  # contexts built the old way are images


def test_balanced_accuracy_is_the_mean_of_each_clients_class_accuracies() -> None:
    scores = {
        0: {"acc": 0.9, "n": 10, "class_acc": {"0": 1.0, "1": 0.0}, "means": {}, "gate": {}},
        1: {"acc": 0.5, "n": 4, "class_acc": {"1": 0.5}, "means": {}, "gate": {}},
    }
    out = summarize(scores, 2)
    assert out["per_client"]["client_balanced_acc"] == {"0": 0.5, "1": 0.5}
    assert out["mean_balanced_acc"] == 0.5 and out["mean_acc"] == pytest.approx(0.7)


def _config(tmp_path: Path, method: str, **extra) -> list[str]:
    args = ["fit", "--config", str(ROOT / "configs" / "heart_disease.yaml")]
    if method != "pfedmoe":
        args += ["--config", str(ROOT / "configs" / "methods" / f"{method}.yaml")]
    args += ["--data.source.init_args.root", str(tmp_path / "data"), "--federation.rounds", "2"]
    args += ["--federation.run_dir", str(tmp_path / method), "--trainer.accelerator", "cpu"]
    return args + [arg for key, value in extra.items() for arg in (f"--{key}", value)]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pfedmoe", "standalone", "fml", "fedavg"])
def test_two_rounds_on_the_four_hospitals(tmp_path, method: str) -> None:
    write_hospitals(tmp_path / "data" / "heart-disease")
    extra = {"client.zoo": "[mlp1]"} if method == "fedavg" else {}
    main(_config(tmp_path, method, **extra))
    summary = json.loads((tmp_path / method / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert [c["train_samples"] + c["test_samples"] for c in summary["clients"]] == [303, 294, 123, 200]
    last = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()][-1]
    assert 0 <= last["mean_balanced_acc"] <= 1 and len(last["per_client"]["client_balanced_acc"]) == 4
    if method == "pfedmoe":  # only MLP-5's extractor crossed the wire: 26*64+64 + 64*64+64 floats per upload
        assert summary["total_bytes_up"] == 2 * 4 * 4 * (26 * 64 + 64 + 64 * 64 + 64)
    partition = json.loads((tmp_path / method / "partition.json").read_text())
    assert [c["site"] for c in partition["clients"]] == ["Cleveland", "Hungary", "Switzerland", "Long Beach VA"]


def test_bad_tabular_inputs_end_in_one_line_exit_2_and_write_nothing(tmp_path, capsys) -> None:
    write_hospitals(tmp_path / "data" / "heart-disease")
    cases = {
        "image overlay": (["--config", str(ROOT / "configs" / "methods" / "fedavg.yaml")], "client.zoo: model 'cnn1'"),
        "image expert": (["--algorithm.init_args.global_expert", "cnn5"], "global_expert: model 'cnn5' reads image"),
        "shift": (["--data.drift", '[{"round": 2, "kind": "shift", "noise": 0.1}]'], "a shift change"),
    }
    for name, (args, message) in cases.items():
        argv = _config(tmp_path, "pfedmoe")
        with pytest.raises(SystemExit) as exit_:
            main(argv[:3] + args + argv[3:])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and message in err and len(err.splitlines()) == 1, name
        assert not (tmp_path / "pfedmoe").exists(), name
    swiss = tmp_path / "data" / "heart-disease" / "processed.switzerland.data"
    for damage, message in (("63,1,1,145,233,1\n", "processed.switzerland.data:1: 6 comma-separated values"),
                            (None, "processed.switzerland.data not found")):  # fmt: skip
        if damage is None:
            swiss.unlink()
        else:
            swiss.write_text(damage)
        with pytest.raises(SystemExit) as exit_:
            main(_config(tmp_path, "pfedmoe"))
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and message in err
        assert len(err.splitlines()) == 1 and not (tmp_path / "pfedmoe").exists()


def test_the_shipped_config_describes_the_hospitals() -> None:
    cfg = yaml.safe_load((ROOT / "configs" / "heart_disease.yaml").read_text())
    assert cfg["data"]["partitioner"]["class_path"] == "fedmoe_pl.data.Natural" and cfg["data"]["num_clients"] == 4
    assert len(HOSPITALS) == 4 and all(m in MLP_SHAPES for m in cfg["client"]["zoo"])


@pytest.mark.slow
def test_per_site_tables_average_each_hospital_over_seeds(tmp_path, monkeypatch, capsys) -> None:
    import runpy

    write_hospitals(tmp_path / "data" / "heart-disease")
    accs = []
    for seed in (0, 1):
        argv = _config(tmp_path, "pfedmoe")
        main([*argv, "--federation.run_dir", str(tmp_path / "runs" / f"s{seed}"), "--seed_everything", str(seed)])
        last = json.loads((tmp_path / "runs" / f"s{seed}" / "metrics.jsonl").read_text().splitlines()[-1])
        accs.append(last["per_client"]["client_acc"])
    capsys.readouterr()
    monkeypatch.setattr("sys.argv", ["per_site.py", str(tmp_path / "runs")])
    runpy.run_path(str(ROOT / "experiments" / "per_site.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "| method | seeds | Cleveland | Hungary | Switzerland | Long Beach VA | mean |" in out
    row = next(line for line in out.splitlines() if line.startswith("| pfedmoe | 2 |"))
    swiss = [a["2"] * 100 for a in accs]
    assert f"{np.mean(swiss):.1f} ± {np.std(swiss, ddof=1):.1f}" == row.split(" | ")[4]


def test_a_run_that_recorded_the_old_default_shared_model_still_resumes() -> None:
    from fedmoe_pl.run.experiment import config_differences

    key = "algorithm.init_args.global_expert"
    assert config_differences({key: "cnn5", "x": 1}, {key: None, "x": 1}) == []  # CNN-5 is null's image model
    assert config_differences({key: None}, {key: "cnn5"}) == []
    assert config_differences({key: "cnn4"}, {key: None}) == [f"{key}: 'cnn4' in the run, None now"]
    assert (
        config_differences({"algorithm.init_args.shared_model": "cnn5"}, {"algorithm.init_args.shared_model": None})
        == []
    )
