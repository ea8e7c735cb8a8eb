"""Distillation losses shared by the knowledge-distillation and mutual-learning baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) on softened distributions; the teacher side carries no gradient."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits.detach() / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)
