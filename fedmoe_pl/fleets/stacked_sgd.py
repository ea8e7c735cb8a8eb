"""Momentum SGD, clipping included, over clients whose parameters are stacked along a leading axis.

What the batched executor (:mod:`fedmoe_pl.fleets.batched`) steps its stacked clients with: each update is
elementwise, so a stacked tensor gets exactly the update each client's own ``torch.optim.SGD``
would give it, and clipping by norm uses each client's own total norm.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedmoe_pl.data.transforms import to_device
from fedmoe_pl.run.trainer_settings import StepRules


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


class Indices:
    """Index tensors of row lists, each made once and kept on the device.

    A stacked step selects the same rows step after step; building the index from a Python list
    every time would copy it to the device each step (a host synchronisation on a GPU).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._made: dict[tuple[int, tuple[int, ...]], torch.Tensor | None] = {}

    def __call__(self, rows: Sequence[int], count: int) -> torch.Tensor | None:
        """The index of ``rows`` among ``count``; None when they are all of them, in order."""
        key = (count, tuple(rows))
        if key not in self._made:
            whole = key[1] == tuple(range(count))
            self._made[key] = None if whole else to_device(torch.tensor(key[1], dtype=torch.long), self.device)
        return self._made[key]


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


def clip_stacked(
    parts: Sequence[tuple[list[torch.Tensor | None], torch.Tensor | None]], clients: int, rules: StepRules
) -> None:
    """Clip the gradients of stacked clients in place, each client by its own total norm.

    A client's parameters may lie in several stacks (parts common to every architecture, and its
    architecture's own): ``parts`` holds each stack's gradients with the positions, among
    ``clients``, of their rows (None: row k is client k).
    """
    assert rules.clip_val is not None
    if rules.clip_algorithm == "value":
        for grads, _ in parts:
            for g in grads:
                if g is not None:
                    g.clamp_(-rules.clip_val, rules.clip_val)
        return
    squared: torch.Tensor | None = None  # (clients,) summed squares of every gradient tensor's norm
    for grads, positions in parts:
        present = [g for g in grads if g is not None]
        if not present:
            continue
        part = torch.stack([g.flatten(1).float().norm(dim=1) for g in present]).square().sum(0)  # (rows,)
        if squared is None:
            squared = torch.zeros(clients, device=part.device)
        squared = squared + part if positions is None else squared.index_add(0, positions, part)
    if squared is None:
        return
    coef = (rules.clip_val / (squared.sqrt() + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_ rule
    for grads, positions in parts:
        rows = coef if positions is None else coef.index_select(0, positions)
        for g in grads:
            if g is not None:
                g.mul_(rows.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
