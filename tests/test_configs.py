"""Every shipped YAML is instantiated, alone or composed the way the README says to use it."""

from pathlib import Path

import pytest

from fedmoe_pl.cli import build_parser, subcommand_parser

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHIPPED = sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in ("methods", "grids", "sweeps"))
METHODS = sorted((CONFIGS / "methods").glob("*.yaml"))
# Grid files and their cells are checked in test_grid.py, sweep files in test_sweeps.py.


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
