"""The batched executor: a round's clients of one architecture train together, one step for all.

Clients whose modules have the same class and the same parameter shapes form a group. Their
parameters and buffers are stacked along a new leading axis (``torch.func.stack_module_state``),
and each step runs the client's own ``training_loss`` for every client of the group at once under
``torch.func.vmap``; one backward pass of the summed losses gives every client its own gradients,
and momentum SGD updates the stacked parameters as ``torch.optim.SGD`` would each client's.

Every client sees exactly the batches of its sequential fit (the same shuffling and augmentation
seeds). Uneven shards are bucketed, not padded: at each step only the clients that still have a
batch take part, grouped by that batch's size, so a client's last, smaller batch and a client with
fewer batches are trained exactly, with no sample dropped or repeated.

A client class opts in with ``batchable = True``: its training loss must be a pure function of
its parameters, buffers and the batch (buffers may be updated in place, as a norm's running
statistics are). Other clients of the round go to the sequential executor, and so does a stacked
group whose step fails (a random op such as dropout, which ``vmap`` refuses, or an error in one
client): each of its clients then trains alone, so a failure is traced to its own client.

Gradient clipping and accumulation (``trainer.gradient_clip_val``, ``accumulate_grad_batches``)
follow the client's manual step exactly; a parameter that got no gradient is left alone, as
``torch.optim.SGD`` leaves it. Trainer settings this executor does not honour are refused when it
is built (:func:`~fedmoe_pl.trainer_settings.batched_refusals`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from fedmoe_pl.algorithms import ClientResult, FederatedClient
from fedmoe_pl.executor import Executor, FitJob, FitOutcome, SequentialExecutor, diverged
from fedmoe_pl.stacked_sgd import StackedSGD, clip_like_torch, clip_stacked, stack_index
from fedmoe_pl.trainer_settings import StepRules, check_batched

log = logging.getLogger(__name__)
Batch = tuple[torch.Tensor, torch.Tensor]


class _Loss(nn.Module):
    """Calls a client's ``training_loss`` as ``forward``, so that ``functional_call`` can run it."""

    def __init__(self, client: FederatedClient) -> None:
        super().__init__()
        self.client = client

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.client.training_loss(x, y)


def group_key(client: FederatedClient) -> tuple[Any, ...]:
    """Clients with equal keys can be stacked: same class, same parameter and buffer shapes."""
    shapes = tuple((name, tuple(t.shape), t.dtype) for name, t in client.state_dict().items())
    return (type(client), shapes)


def epoch_batches(job: FitJob, device: torch.device) -> list[Batch]:
    """Every batch of a job's local fit, augmented and normalized, in the order a Trainer sees them."""
    data = job.data
    data.keep_on(device)
    data.shuffle_seed = job.seed
    loader = data.train_dataloader()  # seeds the shuffling and the augmentation of this fit
    return [
        data.prepare_batch((x.to(device), y.to(device)), training=True) for _ in range(job.epochs) for x, y in loader
    ]


class BatchedExecutor:
    """Trains each architecture group of a round's batchable clients together (see the module docstring).

    Args:
        device: where the stacked clients train.
        fallback: the executor of clients that are not batchable, and of a group whose stacked step
            failed (default: one Trainer each).
        trainer: the ``trainer`` settings (:class:`~fedmoe_pl.trainer_settings.TrainerSettings`):
            ``precision: bf16-mixed`` runs the forward pass under bfloat16 autocast (fp32 otherwise),
            clipping and accumulation as the client's step; any other setting is refused.
        max_group: the most clients stacked in one step. Default: all of a group on a GPU, one on
            a CPU — there a single client's convolutions already keep the cores busy, and vmap's
            batched convolution and pooling are slower than the plain ones (measured in
            ``benchmarks/round_overhead.py``), so each client takes the plain loop's steps.
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        fallback: Executor | None = None,
        trainer: dict[str, Any] | None = None,
        max_group: int | None = None,
    ) -> None:
        trainer = dict(trainer or {})
        check_batched(trainer)
        self.device = torch.device(device)
        self.max_group = max_group if max_group is not None else (1 if self.device.type == "cpu" else None)
        if self.max_group is not None and self.max_group < 1:
            raise ValueError(f"max_group must be a positive number of clients, got {max_group}")
        self.fallback = fallback or SequentialExecutor({"accelerator": "cpu"} if self.device.type == "cpu" else {})
        self.autocast = str(trainer.get("precision")) in ("bf16-mixed", "bf16")
        self.rules = StepRules.from_trainer(trainer)

    def fit(self, jobs: Sequence[FitJob]) -> Iterator[FitOutcome]:
        outcomes: dict[int, FitOutcome] = {}
        groups: dict[tuple[Any, ...], list[int]] = {}
        sequential = []
        for index, job in enumerate(jobs):
            if job.client.batchable:
                groups.setdefault(group_key(job.client), []).append(index)
            else:
                sequential.append(index)
        size = self.max_group or len(jobs)
        for group in groups.values():
            for members in (group[i : i + size] for i in range(0, len(group), size)):
                for index, outcome in zip(members, self._fit_group([jobs[i] for i in members])):
                    outcomes[index] = outcome
        for index, outcome in zip(sequential, self.fallback.fit([jobs[i] for i in sequential])):
            outcomes[index] = outcome
        for index in range(len(jobs)):
            yield outcomes[index]

    # -- one group ------------------------------------------------------------------------------

    def _fit_group(self, jobs: list[FitJob]) -> list[FitOutcome]:
        clients = [job.client for job in jobs]
        try:
            batches = [epoch_batches(job, self.device) for job in jobs]
            losses, params, buffers = self._train(clients, batches, [job.epochs for job in jobs])
        except Exception as err:  # the group's clients keep their state: nothing was written back
            if len(jobs) == 1:
                return [FitOutcome(clients[0].client_id, error=err)]
            log.warning(
                "clients %s could not train stacked (%s: %s); they train one at a time instead",
                [c.client_id for c in clients],
                type(err).__name__,
                str(err).splitlines()[0] if str(err) else "",
            )
            return list(self.fallback.fit(jobs))
        outcomes = []
        for k, (job, client) in enumerate(zip(jobs, clients)):
            loss = losses[k]
            if (error := diverged(loss)) is not None:
                outcomes.append(FitOutcome(client.client_id, error=error))
                continue
            _write_back(client, {name.removeprefix("client."): t[k] for name, t in {**params, **buffers}.items()})
            result = ClientResult(client.client_id, client.upload(), job.data.num_train, {"train_loss": loss})
            outcomes.append(FitOutcome(client.client_id, result=result))
        return outcomes

    def _train(
        self, clients: list[FederatedClient], batches: list[list[Batch]], epochs: list[int]
    ) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Momentum SGD on the stacked clients over their batches.

        Returns each client's mean loss over its last epoch (as a Trainer fit reports it), and the
        stacked parameters and buffers.
        """
        lr, weight_decay, momentum = self._sgd_settings(clients[0])
        steps = [len(b) for b in batches]
        per_epoch = [max(s // e, 1) for s, e in zip(steps, epochs)]
        last_epoch = [s - s // e for s, e in zip(steps, epochs)]  # the first step of each client's last epoch
        if len(clients) == 1:
            return self._train_one(clients[0], batches[0], last_epoch[0], per_epoch[0], lr, weight_decay, momentum)
        shell = _Loss(copy.deepcopy(clients[0])).to(self.device).train()
        stacked_params, stacked_buffers = stack_module_state([_Loss(c) for c in clients])  # copies
        params = {name: p.detach().to(self.device).requires_grad_(True) for name, p in stacked_params.items()}
        buffers = {name: b.to(self.device) for name, b in stacked_buffers.items()}
        sgd = StackedSGD(params, lr, weight_decay, momentum)
        accumulated: list[torch.Tensor | None] = [None] * len(params)  # summed gradients, (G, ...) each
        loss_sum = torch.zeros(len(clients), device=self.device)
        for t in range(max(steps, default=0)):
            buckets: dict[int, list[int]] = {}
            for k in range(len(clients)):
                if t < steps[k]:
                    buckets.setdefault(len(batches[k][t][1]), []).append(k)
            for members in buckets.values():
                x = torch.stack([batches[k][t][0] for k in members])  # (G', B, C, H, W)
                y = torch.stack([batches[k][t][1] for k in members])  # (G', B)
                stepping = [k for k in members if self.rules.steps_after(t % per_epoch[k], per_epoch[k])]
                losses = self._step(shell, params, buffers, sgd, members, stepping, accumulated, x, y)
                counted = [k for k in members if t >= last_epoch[k]]
                loss_sum[counted] += losses[counted]
        means = (loss_sum.cpu() / torch.tensor(per_epoch)).tolist()
        return means, {name: p.detach() for name, p in params.items()}, buffers

    def _train_one(
        self,
        client: FederatedClient,
        batches: list[Batch],
        last_epoch: int,
        per_epoch: int,
        lr: dict[str, float],
        weight_decay: float,
        momentum: float,
    ) -> tuple[list[float], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """A group of one: the client's own step, op for op (accumulation and clipping included), on a
        copy of the client, with no stacking or functional call."""
        wrapped = _Loss(copy.deepcopy(client)).to(self.device).train()
        params: dict[str, torch.Tensor] = dict(wrapped.named_parameters())
        tensors = list(params.values())
        # Clipping sees the parameters in the order of the client's optimizer, as Lightning's does.
        order = {id(p): i for i, p in enumerate(p for g in wrapped.client.param_groups() for p in g["params"])}
        clip_order = sorted(tensors, key=lambda p: order.get(id(p), len(order)))
        sgd = StackedSGD(params, lr, weight_decay, momentum)
        rules = self.rules
        summed: list[torch.Tensor | None] = [None] * len(params)
        loss_sum = torch.zeros((), device=self.device)
        for t, (x, y) in enumerate(batches):
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                loss = wrapped(x, y)
            scaled = loss / rules.accumulate if rules.accumulate > 1 else loss
            grads = torch.autograd.grad(scaled, tensors, allow_unused=True)
            summed = [g if s is None else s if g is None else s + g for s, g in zip(summed, grads)]
            if rules.steps_after(t % per_epoch, per_epoch):
                with torch.no_grad():
                    if rules.clip_val is not None:
                        summed = clip_like_torch(tensors, summed, clip_order, rules)
                    sgd.step(summed, None)
                summed = [None] * len(params)
            if t >= last_epoch:
                loss_sum += loss.detach().float()
        mean = float(loss_sum) / per_epoch
        stacked = {n: p.detach().unsqueeze(0) for n, p in params.items()}
        return [mean], stacked, {n: b.unsqueeze(0) for n, b in wrapped.named_buffers()}

    def _loss(
        self, shell: nn.Module, p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """One client's training loss with the given tensors (norms update their running statistics in ``b``)."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return functional_call(shell, (p, b), (x, y))  # type: ignore[no-any-return]

    def _step(
        self,
        shell: nn.Module,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        sgd: StackedSGD,
        members: list[int],
        stepping: list[int],
        accumulated: list[torch.Tensor | None],
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        """Gradients of the listed clients' batch; an SGD step for those in ``stepping`` (all of them
        without accumulation). Returns the members' losses scattered into a (G,) vector."""
        count = next(iter(params.values())).shape[0]
        rules = self.rules
        index = stack_index(members, count, self.device)
        p = params if index is None else {name: v.index_select(0, index) for name, v in params.items()}
        b = buffers if index is None else {name: v.index_select(0, index) for name, v in buffers.items()}
        losses = vmap(lambda p_, b_, x_, y_: self._loss(shell, p_, b_, x_, y_))(p, b, x, y)  # (G',)
        scaled = (losses / rules.accumulate).sum() if rules.accumulate > 1 else losses.sum()
        grads: list[torch.Tensor | None] = list(torch.autograd.grad(scaled, list(p.values()), allow_unused=True))
        with torch.no_grad():
            if index is not None:
                for name, value in b.items():
                    buffers[name].index_copy_(0, index, value)
            if rules.accumulate == 1:
                step_index = index
            else:
                for i, g in enumerate(grads):
                    if g is None:
                        continue
                    if accumulated[i] is None:
                        accumulated[i] = torch.zeros_like(sgd.params[i])
                    acc = accumulated[i]
                    assert acc is not None
                    acc.add_(g) if index is None else acc.index_add_(0, index, g)
                step_index = stack_index(stepping, count, self.device)
                grads = [
                    None if a is None else a.clone() if step_index is None else a.index_select(0, step_index)
                    for a in accumulated
                ]
                for a in accumulated:
                    if a is not None and stepping:
                        a.zero_() if step_index is None else a.index_fill_(0, step_index, 0.0)
            if stepping:
                if rules.clip_val is not None:
                    clip_stacked(grads, rules)
                sgd.step(grads, step_index)
        out = torch.zeros(count, device=self.device)
        out[members] = losses.detach().float()
        return out

    @staticmethod
    def _sgd_settings(client: FederatedClient) -> tuple[dict[str, float], float, float]:
        """Per-parameter learning rates (from ``param_groups``), weight decay and momentum of a client's SGD."""
        cfg = client.config
        by_id = {}
        for group in client.param_groups():
            for param in group["params"]:
                by_id[id(param)] = group.get("lr", cfg.lr)
        lr = {f"client.{name}": by_id[id(p)] for name, p in client.named_parameters()}
        return lr, cfg.weight_decay, cfg.momentum


def _write_back(client: FederatedClient, tensors: dict[str, torch.Tensor]) -> None:
    """Copy trained tensors into a client's own parameters and buffers (non-persistent ones and
    modules registered under two names included: each tensor is written once, in place)."""
    parameters = dict(client.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            target = parameters[name] if name in parameters else client.get_buffer(name)
            target.copy_(t)
