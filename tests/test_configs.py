"""Every shipped YAML is instantiated, alone or composed the way the README says to use it."""

import itertools
from pathlib import Path

import pytest

from fedmoe_pl.cli import build_parser, subcommand_parser

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "methods")
METHODS = sorted((CONFIGS / "methods").glob("*.yaml"))
PAPER = CONFIGS / "paper"
# The paper's grid (reference protocol): dataset -> classes per client; scale -> (N, C); zoo.
DATASETS = {"cifar10": ("CIFAR10", 2), "cifar100": ("CIFAR100", 10)}
SCALES = {"n10": (10, 1.0), "n50": (50, 0.2), "n100": (100, 0.1)}
ZOOS = {"hetero": ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"], "homo": ["cnn1"]}


def instantiate(*configs: Path):
    parser = subcommand_parser(build_parser(), "fit")
    return parser.instantiate(parser.parse_args([arg for c in configs for arg in ("--config", str(c))]))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_instantiates(path: Path) -> None:
    init = instantiate(path)
    assert init.federation.rounds > 0 and init.data.num_clients >= 1


@pytest.mark.parametrize("overlay", METHODS, ids=lambda p: p.stem)
def test_every_method_overlay_instantiates_on_the_quickstart(overlay: Path) -> None:
    init = instantiate(CONFIGS / "quickstart.yaml", overlay)
    init.algorithm.check(init.client)


def test_the_data_scarce_overlay_composes_with_the_quickstart() -> None:
    init = instantiate(CONFIGS / "quickstart.yaml", CONFIGS / "fmnist_n50.yaml")
    assert (init.data.num_clients, init.federation.participation, init.federation.rounds) == (50, 0.2, 50)
    assert init.data.source.__class__.__name__ == "FashionMNIST"


CELLS = list(itertools.product(DATASETS, SCALES, ZOOS, METHODS))


@pytest.mark.parametrize(("dataset", "scale", "zoo", "method"), CELLS, ids=lambda v: getattr(v, "stem", v))
def test_every_cell_of_the_paper_grid_composes_from_overlays(dataset, scale, zoo, method) -> None:
    init = instantiate(
        PAPER / "base.yaml", PAPER / f"{dataset}.yaml", PAPER / f"{scale}.yaml", PAPER / f"{zoo}.yaml", method
    )
    init.algorithm.check(init.client)  # the method's own check of the setting
    source, classes = DATASETS[dataset]
    assert type(init.data.source).__name__ == source
    assert init.data.partitioner.classes_per_client == classes
    assert (init.data.num_clients, init.federation.participation) == SCALES[scale]
    assert init.client.zoo == (["cnn1"] if method.stem == "fedavg" else ZOOS[zoo])  # FedAvg needs one model
    assert (init.federation.rounds, init.client.lr, init.data.batch_size, init.data.split) == (500, 0.01, 64, "paper")
