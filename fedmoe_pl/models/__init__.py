"""Plain ``nn.Module`` models: the CNN and MLP zoos, the gate and the local mixture of experts."""

from fedmoe_pl.models.cnn import CNN, ZOO_SHAPES, CNNExtractor, CNNShape
from fedmoe_pl.models.gate import GateNorm, GatingNetwork
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
    "ZOO_SHAPES",
    "ZooModel",
    "available_models",
    "build_model",
    "check_model_kind",
    "check_model_spec",
    "contract_gaps",
    "model_kind",
    "model_name",
    "parts",
    "register_model",
]
