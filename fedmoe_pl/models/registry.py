"""Choosing client models by name from YAML.

A zoo entry in a config is either a registered name (``cnn1``) or a ``class_path``/``init_args``
mapping naming any ``nn.Module`` class that follows the :class:`ZooModel` contract. New families
(a ResNet with a projection to the shared width, say) register a factory with
:func:`register_model` and plug into every algorithm without touching the mixture.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, Protocol, Union

import torch
from torch import nn

from fedmoe_pl.data.inputs import ImageInput, InputKind, InputSpec
from fedmoe_pl.models.cnn import CNN, ZOO_SHAPES
from fedmoe_pl.models.mlp import MLP, MLP_SHAPES
from fedmoe_pl.models.text import TEXT_MODELS, build_text_model

ModelSpec = Union[str, dict[str, Any]]  # noqa: UP007 (a runtime alias jsonargparse reads)
ModelFactory = Callable[..., nn.Module]


class ZooModel(Protocol):
    """What the algorithms need from a client model (for type checkers; :func:`contract_gaps` checks it at run time)."""

    extractor: nn.Module  # input -> (B, feature_dim)
    head: nn.Module  # (B, feature_dim) -> (B, num_classes)

    @property
    def feature_dim(self) -> int: ...

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, features: torch.Tensor) -> torch.Tensor: ...


_REGISTRY: dict[str, ModelFactory] = {}
_KIND: dict[str, InputKind] = {}  # the input kind each registered model reads
#: The small model whose extractor is shared where a method shares one (pFedMoE's global expert,
#: the mutual-learning methods' shared model) unless the config names another: the zoo's smallest.
SMALL_MODEL: dict[InputKind, str] = {"image": "cnn5", "tabular": "mlp5", "text": "bag"}


def register_model(name: str, factory: ModelFactory, kind: InputKind = "image") -> None:
    """Make ``factory`` selectable as ``name`` for inputs of ``kind``.

    The factory takes ``num_classes`` and the input description's keyword arguments
    (:meth:`~fedmoe_pl.data.inputs.ImageInput.model_args`): ``in_channels`` and ``image_size`` for
    images, ``num_features`` for tabular rows, ``vocab_size`` and ``seq_len`` for text.
    """
    if name in _REGISTRY:
        raise ValueError(f"a model named {name!r} is already registered; choose another name")
    _REGISTRY[name], _KIND[name] = factory, kind


def available_models(kind: InputKind | None = None) -> list[str]:
    """The registered names (of models for inputs of ``kind``, if given)."""
    return sorted(name for name in _REGISTRY if kind is None or _KIND[name] == kind)


def model_kind(spec: ModelSpec) -> InputKind | None:
    """The input kind a registered model reads (None for a class_path model: it declares none)."""
    return _KIND.get(spec) if isinstance(spec, str) else None


def _cnn_factory(name: str) -> ModelFactory:
    def build(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
        return CNN(ZOO_SHAPES[name], in_channels, image_size, num_classes)

    return build


def _mlp_factory(name: str) -> ModelFactory:
    def build(num_features: int, num_classes: int) -> nn.Module:
        return MLP(MLP_SHAPES[name], num_features, num_classes)

    return build


def _text_factory(name: str) -> ModelFactory:
    def build(vocab_size: int, seq_len: int, num_classes: int) -> nn.Module:
        return build_text_model(name, vocab_size, seq_len, num_classes)

    return build


for _name in ZOO_SHAPES:
    register_model(_name, _cnn_factory(_name))
for _name in MLP_SHAPES:
    register_model(_name, _mlp_factory(_name), kind="tabular")
for _name in TEXT_MODELS:
    register_model(_name, _text_factory(_name), kind="text")


def _import_class(class_path: str) -> type:
    module_name, _, attr = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(
            f"model class_path {class_path!r} cannot be imported ({err}); give a dotted path "
            "such as 'my_package.models.MyNet' that is importable in this environment"
        ) from err


def check_model_spec(spec: ModelSpec) -> None:
    """Fail early, before any data is loaded, on a model name nobody registered."""
    if isinstance(spec, str):
        if spec not in _REGISTRY:
            raise ValueError(
                f"unknown model {spec!r}; registered models are {available_models()} "
                "(or give a mapping with class_path and init_args)"
            )
    elif isinstance(spec, dict):
        if "class_path" not in spec:
            raise ValueError(f"model spec {spec!r} needs a 'class_path' key")
        _import_class(spec["class_path"])
    else:
        raise ValueError(f"model spec {spec!r} must be a registered name or a class_path mapping")


def model_name(spec: ModelSpec) -> str:
    return spec if isinstance(spec, str) else str(spec["class_path"])


def contract_gaps(model: object) -> list[str]:
    """The members of the :class:`ZooModel` contract that ``model`` lacks (empty when it has them all).

    Looked up with ``getattr``: an ``nn.Module`` keeps its sub-modules in ``_modules`` and serves
    them through ``__getattr__``, which the static lookup of ``isinstance`` against a
    runtime-checkable Protocol does not see from Python 3.12 on.
    """
    gaps = [name for name in ("extractor", "head") if not isinstance(getattr(model, name, None), nn.Module)]
    gaps += [name for name in ("forward_features", "forward_head") if not callable(getattr(model, name, None))]
    try:
        int(getattr(model, "feature_dim"))  # noqa: B009 (a property may raise anything)
    except Exception:
        gaps.append("feature_dim")
    return gaps


def parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A zoo model's (extractor, head)."""
    extractor, head = getattr(model, "extractor", None), getattr(model, "head", None)
    if not isinstance(extractor, nn.Module) or not isinstance(head, nn.Module):
        raise TypeError(f"{type(model).__name__} has no `extractor` and `head` sub-modules")
    return extractor, head


def check_model_kind(spec: ModelSpec, inputs: InputSpec, where: str | None = None) -> None:
    """Refuse a registered model that reads another kind of input than the data gives."""
    kind = model_kind(spec)
    if kind is not None and kind != inputs.kind:
        raise ValueError(
            f"{where + ': ' if where else ''}model {spec!r} reads {kind} inputs but the data gives "
            f"{inputs.describe()}; "
            f"use one of {available_models(inputs.kind)} (for a method that trains one architecture, e.g. "
            f"--client.zoo '[{available_models(inputs.kind)[0]}]')"
        )


def build_model(
    spec: ModelSpec,
    in_channels: int = 0,
    image_size: int = 0,
    num_classes: int = 10,
    *,
    inputs: InputSpec | None = None,
) -> nn.Module:
    """Build a client model for the data: ``inputs`` describes one sample (by default images of
    ``in_channels`` x ``image_size`` x ``image_size``)."""
    check_model_spec(spec)
    inputs = inputs or ImageInput(in_channels, image_size)
    check_model_kind(spec, inputs)
    dims = {**inputs.model_args(), "num_classes": num_classes}
    if isinstance(spec, str):
        model = _REGISTRY[spec](**dims)
    else:
        cls = _import_class(spec["class_path"])
        try:
            model = cls(**dims, **spec.get("init_args", {}))
        except TypeError as err:
            if "argument" not in str(err):
                raise
            raise TypeError(
                f"model {model_name(spec)!r} cannot be built for {inputs.describe()}: {err}. A zoo class takes "
                f"num_classes and {', '.join(inputs.model_args())} as keyword arguments"
            ) from err
    gaps = contract_gaps(model)
    if gaps:
        raise TypeError(
            f"model {model_name(spec)!r} ({type(model).__name__}) lacks the zoo contract: it has no "
            f"usable {', '.join(f'`{g}`' for g in gaps)}; a zoo model needs `extractor` and `head` "
            "sub-modules, an integer `feature_dim`, and `forward_features` / `forward_head` methods"
        )
    return model
