"""Plain ``nn.Module`` models: the CNN, MLP and text zoos, the gate and the local mixture of experts."""

from fedmoe_pl.models.cnn import CNN, ZOO_SHAPES, CNNExtractor, CNNShape
from fedmoe_pl.models.gate import GateNorm, GatingNetwork, TokenBag, gate_view
from fedmoe_pl.models.mlp import MLP, MLP_SHAPES, MLPExtractor, MLPShape
from fedmoe_pl.models.moe import LocalMoE
from fedmoe_pl.models.registry import (
    SMALL_MODEL,
    ModelSpec,
    ZooModel,
    available_models,
    build_model,
    check_model_kind,
    check_model_spec,
    contract_gaps,
    model_kind,
    model_name,
    parts,
    register_model,
)
from fedmoe_pl.models.switch_norm import SwitchNorm1d
from fedmoe_pl.models.text import TEXT_MODELS, TextModel

__all__ = [
    "CNN",
    "CNNExtractor",
    "CNNShape",
    "GateNorm",
    "GatingNetwork",
    "LocalMoE",
    "MLP",
    "MLPExtractor",
    "MLPShape",
    "MLP_SHAPES",
    "ModelSpec",
    "SMALL_MODEL",
    "SwitchNorm1d",
    "TEXT_MODELS",
    "TextModel",
    "TokenBag",
    "ZOO_SHAPES",
    "ZooModel",
    "available_models",
    "build_model",
    "check_model_kind",
    "check_model_spec",
    "contract_gaps",
    "gate_view",
    "model_kind",
    "model_name",
    "parts",
    "register_model",
]
