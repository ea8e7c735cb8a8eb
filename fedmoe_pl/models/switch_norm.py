"""Switchable Normalization for flat feature vectors (Luo et al., 2018, arXiv 1806.10779).

The statistics are a learned softmax mixture of *layer* statistics (per sample, over features)
and *batch* statistics (per feature, over the batch). Instance statistics are left out: a flat
vector has no spatial axis to take them over. Batch statistics are tracked as running averages,
so eval mode (and a batch of one) uses them in place of the batch's own.
"""

from __future__ import annotations

import torch
from torch import nn


class SwitchNorm1d(nn.Module):
    """Normalize (B, num_features) inputs with a learned mix of layer and batch statistics."""

    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        # Mixture logits over (layer, batch), separately for means and variances as in the paper.
        self.mean_logits = nn.Parameter(torch.zeros(2))
        self.var_logits = nn.Parameter(torch.zeros(2))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def mixing_weights(self) -> dict[str, tuple[float, float]]:
        """The learned (layer, batch) weights of the mean and of the variance, each summing to 1."""
        with torch.no_grad():
            mean, var = self.mean_logits.softmax(0).tolist(), self.var_logits.softmax(0).tolist()
        return {"mean": (mean[0], mean[1]), "var": (var[0], var[1])}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError(f"SwitchNorm1d expects (batch, features) input, got shape {tuple(x.shape)}")
        mean_ln = x.mean(dim=1, keepdim=True)  # (B, 1)
        var_ln = x.var(dim=1, unbiased=False, keepdim=True)  # (B, 1)
        # A batch of one has no batch variance; it falls back on the running statistics.
        if self.training and x.shape[0] > 1:
            mean_bn = x.mean(dim=0, keepdim=True)  # (1, D)
            var_bn = x.var(dim=0, unbiased=False, keepdim=True)  # (1, D)
            with torch.no_grad():
                n = x.shape[0]
                # copy_ of an out-of-place lerp: the same values as lerp_, and vmap can batch it.
                self.running_mean.copy_(torch.lerp(self.running_mean, mean_bn.squeeze(0), self.momentum))
                self.running_var.copy_(torch.lerp(self.running_var, var_bn.squeeze(0) * n / (n - 1), self.momentum))
        else:
            mean_bn = self.running_mean.unsqueeze(0)  # (1, D)
            var_bn = self.running_var.unsqueeze(0)  # (1, D)
        w_mean = self.mean_logits.softmax(0)
        w_var = self.var_logits.softmax(0)
        mean = w_mean[0] * mean_ln + w_mean[1] * mean_bn  # (B, D)
        var = w_var[0] * var_ln + w_var[1] * var_bn  # (B, D)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
