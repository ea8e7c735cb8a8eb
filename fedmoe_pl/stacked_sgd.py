"""Momentum SGD, clipping included, over clients whose parameters are stacked along a leading axis.

What the batched executor (:mod:`fedmoe_pl.batched`) steps its stacked clients with: each update is
elementwise, so a stacked tensor gets exactly the update each client's own ``torch.optim.SGD``
would give it, and clipping by norm uses each client's own total norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedmoe_pl.trainer_settings import StepRules


class StackedSGD:
    """``torch.optim.SGD`` (momentum, weight decay, no dampening or Nesterov) over stacked clients.

    Each update is elementwise, so a stacked tensor gets exactly the update each client's own
    optimizer would give it. ``index`` restricts a step to some clients; the others keep their
    parameters and momentum, as if they had not stepped at all.
    """

    def __init__(self, params: dict[str, torch.Tensor], lr: dict[str, float], weight_decay: float, momentum: float):
        self.names = list(params)
        self.params = [params[n] for n in self.names]
        self.lr = [lr[n] for n in self.names]
        self.weight_decay, self.momentum = weight_decay, momentum
        # Zero momentum makes the first step's buffer the gradient itself, as SGD's first step sets it.
        self.velocity = [torch.zeros_like(p) for p in self.params] if momentum else []

    def step(self, grads: Sequence[torch.Tensor | None], index: torch.Tensor | None) -> None:
        # A parameter without a gradient is skipped, as torch.optim.SGD skips it: no decay, no momentum.
        active = [k for k, g in enumerate(grads) if g is not None]
        if not active:
            return
        if index is None:  # every client steps: multi-tensor ops, as SGD's foreach path does
            params = [self.params[k] for k in active]
            d: list[torch.Tensor] = [grads[k] for k in active]  # type: ignore[misc]
            if self.weight_decay:
                d = list(torch._foreach_add(d, params, alpha=self.weight_decay))
            if self.momentum:
                velocity = [self.velocity[k] for k in active]
                torch._foreach_mul_(velocity, self.momentum)
                torch._foreach_add_(velocity, d)
                d = velocity
            by_lr: dict[float, list[int]] = {}
            for i, k in enumerate(active):
                by_lr.setdefault(self.lr[k], []).append(i)
            for lr, members in by_lr.items():
                torch._foreach_add_([params[i] for i in members], [d[i] for i in members], alpha=-lr)
            return
        for k in active:
            param, grad = self.params[k], grads[k]
            assert grad is not None
            value = param.index_select(0, index)
            step = grad.add(value, alpha=self.weight_decay) if self.weight_decay else grad
            if self.momentum:
                step = self.velocity[k].index_select(0, index).mul_(self.momentum).add_(step)
                self.velocity[k].index_copy_(0, index, step)
            param.index_copy_(0, index, value.add(step, alpha=-self.lr[k]))


def stack_index(members: list[int], count: int, device: torch.device) -> torch.Tensor | None:
    """The index of some clients of a stack; None when it is all of them."""
    return None if len(members) == count else torch.tensor(members, device=device, dtype=torch.long)


def clip_like_torch(
    params: list[torch.Tensor], grads: list[torch.Tensor | None], order: list[torch.Tensor], rules: StepRules
) -> list[torch.Tensor | None]:
    """One client's gradients clipped by the very function Lightning's ``clip_gradients`` calls."""
    for param, grad in zip(params, grads):
        param.grad = grad
    assert rules.clip_val is not None
    if rules.clip_algorithm == "value":
        torch.nn.utils.clip_grad_value_(order, rules.clip_val)
    else:
        torch.nn.utils.clip_grad_norm_(order, rules.clip_val)
    clipped = [param.grad for param in params]
    for param in params:
        param.grad = None
    return clipped


def clip_stacked(grads: list[torch.Tensor | None], rules: StepRules) -> None:
    """Clip every client's gradients in a stack, in place: each client by its own total norm."""
    assert rules.clip_val is not None
    present = [g for g in grads if g is not None]
    if not present:
        return
    if rules.clip_algorithm == "value":
        for g in present:
            g.clamp_(-rules.clip_val, rules.clip_val)
        return
    norms = torch.stack([g.flatten(1).float().norm(dim=1) for g in present])  # (P, G)
    total = torch.linalg.vector_norm(norms, dim=0)  # (G,)
    coef = (rules.clip_val / (total + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ rule
    for g in present:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
