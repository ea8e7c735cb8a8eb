"""The client side every method shares: its settings, what it is told at build time, its LightningModule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from fedmoe_pl.aggregation import Payload
from fedmoe_pl.data.inputs import ImageInput, InputSpec
from fedmoe_pl.models import SMALL_MODEL, ModelSpec, build_model, check_model_spec
from fedmoe_pl.run.trainer_settings import StepRules

DEFAULT_ZOO: list[ModelSpec] = ["cnn1", "cnn2", "cnn3", "cnn4", "cnn5"]


@dataclass
class ClientConfig:
    """Settings every client shares, whatever the method.

    Args:
        zoo: client models; client k gets ``zoo[k % len(zoo)]`` (a registered name or a
            class_path/init_args mapping). The default is the paper's heterogeneous setting.
        lr: SGD learning rate (paper setting 0.01).
        momentum: SGD momentum (sibling code: 0.9).
        weight_decay: SGD weight decay (sibling code: 1e-3).
    """

    zoo: list[ModelSpec] = field(default_factory=lambda: list(DEFAULT_ZOO))
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-3

    def __post_init__(self) -> None:
        if not self.zoo:
            raise ValueError("client.zoo is empty; list at least one model, e.g. [cnn1]")
        for spec in self.zoo:
            check_model_spec(spec)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"client.lr must be a positive number, got {self.lr}")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"client.{name} must be a non-negative number, got {value}")

    def model_for(self, client_id: int) -> ModelSpec:
        return self.zoo[client_id % len(self.zoo)]

    @property
    def homogeneous(self) -> bool:
        return all(spec == self.zoo[0] for spec in self.zoo)


@dataclass(frozen=True)
class ClientContext:
    """What a method needs to know to build client ``client_id``.

    ``inputs`` describes one sample of the client's data; left out, it is an image of
    ``in_channels`` x ``image_size`` x ``image_size`` (the two are 0 for other inputs).
    """

    client_id: int
    model: ModelSpec
    in_channels: int
    image_size: int
    num_classes: int
    config: ClientConfig
    inputs: InputSpec | None = None

    def __post_init__(self) -> None:
        if self.inputs is None:
            object.__setattr__(self, "inputs", ImageInput(self.in_channels, self.image_size))

    @property
    def sample(self) -> InputSpec:
        """The description of one input sample (``inputs``, filled in)."""
        assert self.inputs is not None  # set in __post_init__
        return self.inputs

    def small_model(self, spec: ModelSpec | None) -> ModelSpec:
        """``spec``, or where it is None the smallest zoo model for this client's inputs (CNN-5 for images)."""
        return spec if spec is not None else SMALL_MODEL[self.sample.kind]

    def build(self, spec: ModelSpec | None = None) -> Any:
        """A zoo model (this client's own unless ``spec`` names another) for this client's data."""
        return build_model(spec or self.model, num_classes=self.num_classes, inputs=self.sample)


def state_payload(module: nn.Module) -> Payload:
    """A module's state dict as a payload, detached from autograd and the module's storage."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class FederatedClient(L.LightningModule):
    """Base LightningModule of a federated client: cross-entropy, SGD, upload/download, evaluation.

    Subclasses implement :meth:`forward` and, where they share a sub-module, name it ``shared``
    (an attribute or a property): :meth:`upload` and :meth:`download` move its state. Clients that
    share something else override the two. Per-client Trainers log nothing; the federation reads :attr:`train_loss`
    and :meth:`evaluate` instead.

    Args:
        ctx: the client's id, data shape and the shared :class:`ClientConfig` (its SGD settings).
    """

    #: Whether the batched executor may train this client stacked with others: its
    #: ``training_loss`` is a pure function of its parameters, buffers and the batch (buffers may be
    #: updated in place), with no other state and no hooks that matter during a local fit.
    batchable: bool = False

    #: Sub-modules of a batchable client whose shapes are the same whatever its architecture (pFedMoE:
    #: the gate and the global expert). When a class names them and implements
    #: :meth:`common_forward` and :meth:`loss_after_common`, the batched executor stacks these parts
    #: across every architecture of a round and only the rest per architecture.
    stacked_across: tuple[str, ...] = ()

    #: Clipping and accumulation of the manual step; the executor sets them from ``trainer`` before a fit.
    step_rules: StepRules = StepRules()

    def __init__(self, ctx: ClientContext) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.client_id, self.num_classes, self.config = ctx.client_id, ctx.num_classes, ctx.config
        self._loss_sum = torch.zeros(())
        self._loss_steps = 0

    # -- what the method defines -------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(x), y)

    def common_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """What the :attr:`stacked_across` parts compute from a batch (they alone may be used)."""
        raise NotImplementedError(f"{type(self).__name__} stacks nothing across architectures")

    def loss_after_common(self, common: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:meth:`training_loss` from :meth:`common_forward`'s outputs and the client's other parts."""
        raise NotImplementedError(f"{type(self).__name__} stacks nothing across architectures")

    def predict_with_extras(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and per-sample diagnostics, shape (B,), that the evaluator averages per client.

        An extra named ``gate_*`` (a weight in [0, 1]) is also summarised per class and as a
        histogram (:mod:`fedmoe_pl.analysis.evaluation`).
        """
        return self(x), {}

    def diagnostics(self) -> dict[str, float]:
        """Numbers of the client's model itself (not of its data) that each evaluation records per
        client, such as a learned mixing weight; none by default."""
        return {}

    def upload(self) -> Payload:
        """What this client sends to the server after local training: by default the state of its
        ``shared`` sub-module (an attribute or a property naming the part that crosses the wire), or
        nothing for a client without one."""
        shared = getattr(self, "shared", None)
        return {} if shared is None else state_payload(shared)

    def download(self, payload: Payload) -> None:
        """Apply state the server sent: by default, load it into the ``shared`` sub-module."""
        shared = getattr(self, "shared", None)
        if shared is not None:
            shared.load_state_dict(payload)

    def configure_round(self, **settings: Any) -> None:
        """Apply per-round settings the server sent (a compression level, say); none by default."""
        if settings:
            raise TypeError(f"{type(self).__name__} takes no round settings, got {sorted(settings)}")

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": list(self.parameters())}]

    # -- Lightning hooks ------------------------------------------------------------------

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cfg = self.config
        return torch.optim.SGD(self.param_groups(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def on_train_epoch_start(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._loss_steps = 0

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # Manual optimization: the step a plain loop takes (zero the gradients, backward, SGD step),
        # without the closure machinery of automatic optimization around it (measured: about 1 ms
        # a step, a few per cent of a quickstart round on a CPU). With accumulation, the gradients
        # of ``accumulate`` batches add up (each loss divided by it) before one step.
        x, y = batch
        optimizer = self.optimizers()
        assert not isinstance(optimizer, list), "a client has one optimizer (configure_optimizers)"
        rules = self.step_rules
        loss = self.training_loss(x, y)
        if batch_idx % rules.accumulate == 0:
            optimizer.zero_grad()
        self.manual_backward(loss / rules.accumulate if rules.accumulate > 1 else loss)
        if rules.steps_after(batch_idx, int(self.trainer.num_training_batches)):
            optimizer.step()  # clipping, if any, happens in on_before_optimizer_step (after AMP's unscaling)
        self._loss_sum += loss.detach()  # summed on device: no host sync per step
        self._loss_steps += 1
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this hook once the gradients are final (unscaled under 16-bit AMP).
        clip_val, algorithm = self.step_rules.clip_val, self.step_rules.clip_algorithm
        if clip_val is not None:
            self.clip_gradients(optimizer, gradient_clip_val=clip_val, gradient_clip_algorithm=algorithm)

    @property
    def train_loss(self) -> float:
        """Mean training loss of the last local epoch."""
        return float(self._loss_sum) / max(self._loss_steps, 1)
