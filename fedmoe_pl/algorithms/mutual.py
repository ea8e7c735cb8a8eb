"""Mutual-learning baselines: a private model and a small shared model trained side by side.

FML, FedKD and FedAPEN all give each client its own (heterogeneous) model plus a copy of a small
homogeneous model; only the small model crosses the client boundary and is averaged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe_pl.aggregation import Payload, weighted_mean
from fedmoe_pl.algorithms.base import Algorithm, ClientResult, Instruction, check_number
from fedmoe_pl.algorithms.client import ClientContext, FederatedClient, state_payload
from fedmoe_pl.algorithms.losses import kl
from fedmoe_pl.models import ModelSpec, check_model_spec


class MutualClient(FederatedClient):
    """Private model + shared model; subclasses define the joint loss and the prediction.

    Args:
        ctx: the client's id, data shape and SGD settings.
        private: the client's own zoo model (used for prediction unless a subclass says otherwise).
        shared: the client's copy of the small shared model.
    """

    private: Any  # zoo models (nn.Module with the ZooModel attributes)
    shared: Any

    def __init__(self, ctx: ClientContext, private: nn.Module, shared: nn.Module) -> None:
        super().__init__(ctx)
        self.private, self.shared = private, shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.private(x)  # type: ignore[no-any-return]


class MutualAlgorithm(Algorithm):
    """Builds (private, shared) pairs; averages the shared models by sample count.

    Args:
        shared_model: zoo model every client holds a copy of; None: the smallest model of the data's
            zoo (CNN-5 for images, MLP-5 for tabular rows).
    """

    def __init__(self, shared_model: ModelSpec | None = None) -> None:
        if shared_model is not None:
            check_model_spec(shared_model)
        self.shared_model = shared_model

    def model_specs(self) -> dict[str, ModelSpec]:
        return {} if self.shared_model is None else {"shared_model": self.shared_model}

    def models(self, ctx: ClientContext) -> tuple[nn.Module, nn.Module]:
        """A client's (private, shared) pair."""
        return ctx.build(), ctx.build(ctx.small_model(self.shared_model))


# -- FML ----------------------------------------------------------------------------------------


class FMLClient(MutualClient):
    """An FML client: private and meme model learn from the labels and from each other."""

    def __init__(self, ctx: ClientContext, private: nn.Module, shared: nn.Module, method: FML) -> None:
        super().__init__(ctx, private, shared)
        self.method = method

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        alpha, beta = self.method.alpha, self.method.beta
        local, meme = self.private(x), self.shared(x)
        local_loss = alpha * F.cross_entropy(local, y) + (1 - alpha) * kl(local, meme)
        meme_loss = beta * F.cross_entropy(meme, y) + (1 - beta) * kl(meme, local)
        return local_loss + meme_loss


class FML(MutualAlgorithm):
    """FML, federated mutual learning (Shen et al., 2020, arXiv 2006.16765).

    Up: the client's copy of the shared "meme" model. Down: its sample-weighted average. Each
    client trains its private model with ``alpha * CE + (1 - alpha) * KL(meme || private)`` and the
    meme with ``beta * CE + (1 - beta) * KL(private || meme)``; the paper's defaults are 0.5.
    Inference uses the private model.

    Args:
        shared_model: zoo model used as the shared meme model (None: CNN-5 / MLP-5, as the data).
        alpha: CE weight of the private model's loss.
        beta: CE weight of the meme model's loss.
    """

    def __init__(self, shared_model: ModelSpec | None = None, alpha: float = 0.5, beta: float = 0.5) -> None:
        super().__init__(shared_model)
        check_number("FML", "alpha", alpha, 0.0, 1.0)
        check_number("FML", "beta", beta, 0.0, 1.0)
        self.alpha, self.beta = alpha, beta

    def build_client(self, ctx: ClientContext) -> FMLClient:
        return FMLClient(ctx, *self.models(ctx), self)


# -- FedAPEN ------------------------------------------------------------------------------------


class FedAPENClient(MutualClient):
    """A FedAPEN client: mutual learning plus a learned weight that mixes the two models' predictions."""

    def __init__(self, ctx: ClientContext, private: nn.Module, shared: nn.Module) -> None:
        super().__init__(ctx, private, shared)
        self.ensemble_logit = nn.Parameter(torch.zeros(()))  # sigmoid -> weight of the shared model

    @property
    def ensemble_weight(self) -> torch.Tensor:
        return torch.sigmoid(self.ensemble_logit)

    def _mix(self, p_private: torch.Tensor, p_shared: torch.Tensor) -> torch.Tensor:
        w = self.ensemble_weight
        return w * p_shared + (1 - w) * p_private  # (B, K) probabilities

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        private, shared = self.private(x), self.shared(x)
        mutual = F.cross_entropy(private, y) + kl(private, shared) + F.cross_entropy(shared, y) + kl(shared, private)
        # The ensemble weight learns from detached predictions, so it cannot bend either model.
        mixed = self._mix(private.detach().softmax(1), shared.detach().softmax(1))
        return mutual + F.nll_loss(mixed.clamp_min(1e-8).log(), y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._mix(self.private(x).softmax(1), self.shared(x).softmax(1)).clamp_min(1e-8).log()

    def predict_with_extras(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self(x), {"ensemble_weight": self.ensemble_weight.expand(len(x))}


class FedAPEN(MutualAlgorithm):
    """FedAPEN (Qin et al., KDD 2023): mutual learning with an adaptive per-client ensemble.

    Up: the shared model. Down: its sample-weighted average. Each client trains private and shared
    model with CE plus mutual KL, and a learned weight w mixes their predictions,
    ``p = w * p_shared + (1 - w) * p_private``, which is also how it predicts. The paper fits w on a
    held-out slice after local training; here w is fitted in the same steps on detached predictions,
    which keeps it from influencing either model and needs no data held out.

    Args:
        shared_model: zoo model used as the shared model (None: CNN-5 / MLP-5, as the data).
    """

    def build_client(self, ctx: ClientContext) -> FedAPENClient:
        return FedAPENClient(ctx, *self.models(ctx))


# -- FedKD --------------------------------------------------------------------------------------


def svd_compress(payload: Payload, energy: float) -> Payload:
    """Factor every matrix-like tensor as U S V^T, keeping the smallest rank holding ``energy`` of
    the squared singular values; tensors that would not shrink are sent as they are."""
    out: Payload = {}
    for key, t in payload.items():
        if t.dim() < 2 or not t.is_floating_point():
            out[key] = t
            continue
        m = t.reshape(t.shape[0], -1)  # (out, in*...)
        u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
        share = (s**2).cumsum(0) / (s**2).sum().clamp_min(1e-30)
        rank = int(torch.searchsorted(share, torch.tensor(energy, dtype=share.dtype)).item()) + 1
        rank = min(rank, len(s))
        if rank * (m.shape[0] + m.shape[1] + 1) >= m.numel():
            out[key] = t
            continue
        out[f"{key}::U"] = u[:, :rank].to(t.dtype).contiguous()
        out[f"{key}::S"] = s[:rank].to(t.dtype)
        out[f"{key}::V"] = vh[:rank].to(t.dtype).contiguous()
        out[f"{key}::shape"] = torch.tensor(t.shape)
    return out


def svd_restore(payload: Payload) -> Payload:
    out: Payload = {}
    for key, t in payload.items():
        if "::" not in key:
            out[key] = t
        elif key.endswith("::U"):
            base = key[: -len("::U")]
            u, s, v = t, payload[f"{base}::S"], payload[f"{base}::V"]
            out[base] = ((u * s) @ v).reshape(torch.Size(payload[f"{base}::shape"].tolist()))
    return out


class FedKDClient(MutualClient):
    """A FedKD client: the private teacher and the shared student distil into each other.

    Uploads are SVD-compressed at the energy the server sets for the round (``configure_round``).
    """

    def __init__(self, ctx: ClientContext, private: nn.Module, shared: nn.Module) -> None:
        super().__init__(ctx, private, shared)
        self.energy: float | None = None

    def configure_round(self, energy: float | None = None) -> None:  # type: ignore[override]
        self.energy = energy

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t_feat = self.private.forward_features(x)  # (B, W) teacher = private model
        s_feat = self.shared.forward_features(x)  # (B, W) student = shared model
        t_logits, s_logits = self.private.forward_head(t_feat), self.shared.forward_head(s_feat)
        t_task, s_task = F.cross_entropy(t_logits, y), F.cross_entropy(s_logits, y)
        # Adaptive: distillation counts more when both models already solve the task well.
        scale = 1.0 / (t_task + s_task).detach().clamp_min(1e-6)
        hidden = F.mse_loss(s_feat, t_feat.detach()) + F.mse_loss(t_feat, s_feat.detach())
        distill = kl(s_logits, t_logits) + kl(t_logits, s_logits)
        return t_task + s_task + scale * (distill + hidden)

    def upload(self) -> Payload:
        state = state_payload(self.shared)
        return state if self.energy is None else svd_compress(state, self.energy)

    def download(self, payload: Payload) -> None:
        self.shared.load_state_dict(svd_restore(payload))


class FedKD(MutualAlgorithm):
    """FedKD (Wu et al., Nature Communications 2022, arXiv 2108.13323).

    Up: the shared student model, optionally SVD-compressed: each matrix keeps the smallest rank
    holding a share T of its squared singular values. As in the paper, T grows linearly over the
    run, from ``svd_energy`` in round 1 to ``svd_energy_end`` in the last round (the paper: 0.95 to
    0.98), so later, finer updates lose less. Down: the sample-weighted average, compressed at the
    same round's T. The private model is the teacher. Both models minimise CE plus mutual KL and
    mutual hidden-state MSE; the two distillation terms are divided by the sum of the two task
    losses (the paper's adaptive weight).

    Args:
        shared_model: zoo model used as the shared student (None: CNN-5 / MLP-5, as the data).
        svd_energy: T in round 1; ``None`` sends full tensors.
        svd_energy_end: T in the last round; ``None`` keeps ``svd_energy`` throughout.
    """

    def __init__(
        self,
        shared_model: ModelSpec | None = None,
        svd_energy: float | None = None,
        svd_energy_end: float | None = 0.98,
    ) -> None:
        super().__init__(shared_model)
        for name, value in (("svd_energy", svd_energy), ("svd_energy_end", svd_energy_end)):
            if value is not None and not 0 < value <= 1:
                raise ValueError(f"FedKD {name}={value} must lie in (0, 1], or be null")
        self.svd_energy, self.svd_energy_end = svd_energy, svd_energy_end

    def build_client(self, ctx: ClientContext) -> FedKDClient:
        return FedKDClient(ctx, *self.models(ctx))

    def energy(self, round_: int) -> float | None:
        """T of one round: linear from ``svd_energy`` (round 1) to ``svd_energy_end`` (the last round)."""
        if self.svd_energy is None or self.svd_energy_end is None:
            return self.svd_energy
        progress = (round_ - 1) / max(self.rounds - 1, 1)
        return self.svd_energy + (self.svd_energy_end - self.svd_energy) * progress

    def configure(self, round_: int, client_ids: Sequence[int]) -> dict[int, Instruction]:
        instructions = self.catch_up(client_ids)
        for client_id in client_ids:
            instructions.setdefault(client_id, Instruction()).settings["energy"] = self.energy(round_)
        return instructions

    def combine(self, round_: int, results: Sequence[ClientResult]) -> Payload:
        merged = weighted_mean([svd_restore(r.upload) for r in results], [r.num_samples for r in results])
        energy = self.energy(round_)
        return merged if energy is None else svd_compress(merged, energy)
