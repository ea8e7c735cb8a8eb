import inspect
import sys
import typing

import pytest
import torch
from torch import nn

from fedmoe_pl.models import ZOO_SHAPES, build_model, check_model_spec, contract_gaps


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("name", "total", "extractor"),
    [
        ("cnn1", 2_621_558, 2_616_548),
        ("cnn2", 1_815_142, 1_810_132),
        ("cnn3", 1_320_558, 1_315_548),
        ("cnn4", 1_060_358, 1_055_348),
        ("cnn5", 670_058, 665_048),
    ],
)
def test_parameter_counts_match_the_paper_zoo(name: str, total: int, extractor: int) -> None:
    model = build_model(name, in_channels=3, image_size=32, num_classes=10)
    assert count(model) == total
    assert count(model.extractor) == extractor


def test_hundred_classes_only_grow_the_head() -> None:
    for name in ZOO_SHAPES:
        ten, hundred = build_model(name, 3, 32, 10), build_model(name, 3, 32, 100)
        assert count(hundred) - count(ten) == 45_090


def test_cnn5_extractor_on_gray_28px_is_the_quickstart_upload() -> None:
    assert count(build_model("cnn5", 1, 28, 10).extractor) == 520_248


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (3, 16)])
def test_forward_features_and_head_shapes(channels: int, size: int) -> None:
    model = build_model("cnn2", channels, size, 7)
    x = torch.randn(4, channels, size, size)
    features = model.forward_features(x)
    assert features.shape == (4, 500) == (4, model.feature_dim)
    assert model.forward_head(features).shape == (4, 7)
    assert torch.equal(model(x), model.forward_head(features))


def test_too_small_images_are_refused_with_the_size() -> None:
    with pytest.raises(ValueError, match="image_size=12"):
        build_model("cnn1", 1, 12, 10)


def test_unknown_model_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'cnn9'.*cnn1"):
        check_model_spec("cnn9")


class TinyNet(nn.Module):
    """A custom family following the zoo contract, built from a class_path."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 500) -> None:
        super().__init__()
        self.extractor = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, width))
        self.extractor.out_features = width  # type: ignore[assignment]
        self.head = nn.Linear(width, num_classes)

    @property
    def feature_dim(self) -> int:
        return 500

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.extractor(x)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.head(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def test_class_path_models_are_built_with_the_data_shape() -> None:
    model = build_model({"class_path": f"{__name__}.TinyNet", "init_args": {"width": 500}}, 1, 16, 3)
    assert isinstance(model, TinyNet)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)


def test_class_path_without_the_contract_is_refused() -> None:
    with pytest.raises(TypeError, match="zoo contract"):
        build_model({"class_path": "torch.nn.Identity"}, 1, 16, 3)  # accepts any kwargs, has no head


class Headless(TinyNet):
    """TinyNet without its head: the contract check must name exactly what is missing."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__(in_channels, image_size, num_classes)
        del self.head


def _static_hasattr(obj: object, name: str) -> bool:
    try:
        inspect.getattr_static(obj, name)
    except AttributeError:
        return False
    return True


@pytest.fixture
def static_lookup(monkeypatch):
    """Protocol ``isinstance`` as Python 3.12+ does it (static lookup), on every interpreter.

    Up to 3.11, ``typing`` checks Protocol members with ``hasattr``; shadowing that name in its
    namespace reproduces the later rules, so the suite catches a relapse on 3.10/3.11 too.
    """
    if sys.version_info < (3, 12):
        monkeypatch.setattr(typing, "hasattr", _static_hasattr, raising=False)


@pytest.mark.parametrize("spec", ["cnn1", "cnn5", {"class_path": f"{__name__}.TinyNet"}], ids=str)
def test_contract_check_sees_submodules_that_static_lookup_cannot(static_lookup, spec) -> None:
    model = build_model(spec, 1, 16, 3)
    # The premise: nn.Module serves sub-modules through __getattr__, invisible to static lookup.
    assert not _static_hasattr(model, "extractor") and not _static_hasattr(model, "head")
    assert contract_gaps(model) == []


def test_contract_check_still_rejects_a_model_without_a_head(static_lookup) -> None:
    assert contract_gaps(Headless(1, 16, 3)) == ["head"]
    with pytest.raises(TypeError, match=r"Headless.*no usable `head`"):
        build_model({"class_path": f"{__name__}.Headless"}, 1, 16, 3)
