"""The batched executor: a round's clients train together, one step for all of a group.

Clients whose modules have the same class and the same parameter shapes form a group. Their
parameters and buffers are stacked along a new leading axis, and each step runs the client's own
``training_loss`` for every client of the group at once under ``torch.func.vmap``; one backward
pass of the summed losses gives every client its own gradients, and momentum SGD updates the
stacked parameters as ``torch.optim.SGD`` would each client's.

A class whose clients share parts of equal shapes whatever their architecture (pFedMoE's gate and
global expert: ``stacked_across``) forms one group across architectures: those parts are one
stack over every client of the round, run once per step, and only the clients' own parts (local
expert and head) are stacked per architecture. Each client's gradient, clipping and step are the
same as when its architecture trains alone.

Every client sees exactly the batches of its sequential fit (the same shuffling and augmentation
seeds). They are made as training reaches them, one batch per client at a time, on the device
that trains: the memory a group needs beyond its shards and parameters is one batch per client.
Uneven shards are bucketed, not padded: at each step only the clients that still have a batch
take part, grouped by that batch's size, so a client's last, smaller batch and a client with
fewer batches are trained exactly, with no sample dropped or repeated. Inside a step nothing
waits for the device: row indices are made once and kept there, losses add up there.

A client class opts in with ``batchable = True``: its training loss must be a pure function of
its parameters, buffers and the batch (buffers may be updated in place, as a norm's running
statistics are). Other clients of the round go to the sequential executor, and so does a stacked
group whose step fails (a random op such as dropout, which ``vmap`` refuses, or an error in one
client): each of its clients then trains alone, so a failure is traced to its own client.

Gradient clipping and accumulation (``trainer.gradient_clip_val``, ``accumulate_grad_batches``)
follow the client's manual step exactly; a parameter that got no gradient is left alone, as
``torch.optim.SGD`` leaves it. Trainer settings this executor does not honour are refused when it
is built (:func:`~fedmoe_pl.run.trainer_settings.batched_refusals`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from fedmoe_pl.algorithms import ClientResult, FederatedClient
from fedmoe_pl.fleets.executor import Executor, FitJob, FitOutcome, SequentialExecutor, diverged
from fedmoe_pl.fleets.stacked_sgd import Indices, StackedSGD, clip_like_torch, clip_stacked
from fedmoe_pl.run.trainer_settings import StepRules, check_batched

log = logging.getLogger(__name__)
Batch = tuple[torch.Tensor, torch.Tensor]
PREFIX = "client."  # the wrappers below hold the client as ``client``


class _Loss(nn.Module):
    """Calls a client's ``training_loss`` as ``forward``, so that ``functional_call`` can run it."""

    def __init__(self, client: FederatedClient) -> None:
        super().__init__()
        self.client = client

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.client.training_loss(x, y)


class _Common(nn.Module):
    """Calls a client's ``common_forward``: the parts stacked across architectures."""

    def __init__(self, client: FederatedClient) -> None:
        super().__init__()
        self.client = client

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.client.common_forward(x)


class _Own(nn.Module):
    """Calls a client's ``loss_after_common``: its own parts, given the common parts' outputs."""

    def __init__(self, client: FederatedClient) -> None:
        super().__init__()
        self.client = client

    def forward(self, common: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.client.loss_after_common(common, x, y)


def _chosen(client: FederatedClient, common: bool | None) -> Callable[[str], bool]:
    """Which of a client's tensor names to take: all (None), its common parts (True) or the rest (False)."""
    parts = tuple(f"{name}." for name in client.stacked_across)
    return lambda name: common is None or name.startswith(parts) == common


def _shapes(client: FederatedClient, common: bool | None = None) -> tuple[Any, ...]:
    """Names, shapes and dtypes of a client's tensors: all (None), its common parts (True) or the rest."""
    chosen = _chosen(client, common)
    return tuple((name, tuple(t.shape), t.dtype) for name, t in client.state_dict().items() if chosen(name))


def group_key(client: FederatedClient) -> tuple[Any, ...]:
    """Clients with equal keys train in one group: the same class and the same shapes of what is
    stacked over the whole group (the parts common to every architecture, where the class names them)."""
    return (type(client), _shapes(client, True if client.stacked_across else None))


def architecture_key(client: FederatedClient) -> tuple[Any, ...]:
    """Clients with equal keys have every tensor of the same shape."""
    return (type(client), _shapes(client))


class JobBatches:
    """A job's local fit as batches, made one at a time on ``device`` in the order a Trainer sees them.

    Attributes:
        per_epoch: batches in one epoch.
        total: batches in the whole fit.
    """

    def __init__(self, job: FitJob, device: torch.device) -> None:
        self.data, self.device, self.epochs = job.data, device, job.epochs
        self.data.keep_on(device)
        self.data.shuffle_seed = job.seed
        self.loader = self.data.train_dataloader()  # seeds the shuffling and the augmentation of this fit
        self.per_epoch = len(self.loader)
        self.total = self.per_epoch * job.epochs

    def __iter__(self) -> Iterator[Batch]:
        for _ in range(self.epochs):
            for x, y in self.loader:
                yield self.data.prepare_batch((x.to(self.device), y.to(self.device)), training=True)


def epoch_batches(job: FitJob, device: torch.device) -> list[Batch]:
    """Every batch of a job's local fit at once (for checks; training makes them as it goes)."""
    return list(JobBatches(job, device))


@dataclass
class _Stack:
    """Some tensors of some clients of a group, stacked along a leading axis, with their optimizer."""

    members: list[int]  # the group positions of the rows, ascending
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    sgd: StackedSGD
    accumulated: list[torch.Tensor | None] = field(init=False)  # summed gradients (accumulation)

    def __post_init__(self) -> None:
        self.row = {k: r for r, k in enumerate(self.members)}
        self.accumulated = [None] * len(self.params)

    def rows(self, positions: Sequence[int]) -> list[int]:
        return [self.row[k] for k in positions if k in self.row]


@dataclass
class _Plan:
    """How a group trains: one stack over all (``own`` empty), or common parts over all and own parts
    per architecture, each with the module a functional call runs."""

    common: _Stack
    shell: nn.Module  # _Loss of one client, or _Common when the group is split
    own: list[tuple[_Stack, nn.Module]]  # (stack, _Own) per architecture

    @property
    def stacks(self) -> list[_Stack]:
        return [self.common, *(stack for stack, _ in self.own)]


class BatchedExecutor:
    """Trains each group of a round's batchable clients together (see the module docstring).

    Args:
        device: where the stacked clients train.
        fallback: the executor of clients that are not batchable, and of a group whose stacked step
            failed (default: one Trainer each).
        trainer: the ``trainer`` settings (:class:`~fedmoe_pl.run.trainer_settings.TrainerSettings`):
            ``precision: bf16-mixed`` runs the forward pass under bfloat16 autocast (fp32 otherwise),
            clipping and accumulation as the client's step; any other setting is refused.
        batched_group: the most clients stacked in one step. Default: all of a group on a GPU, one on
            a CPU — there a single client's convolutions already keep the cores busy, and vmap's
            batched convolution and pooling are slower than the plain ones (measured in
            ``benchmarks/round_overhead.py``), so each client takes the plain loop's steps.
        across_architectures: stack the parts a class shares across architectures (``stacked_across``)
            over every architecture of a round; False stacks each architecture apart (the comparison
            ``benchmarks/gpu_check.py`` times).
    """

    def __init__(
        self,
        device: torch.device | str = "cpu",
        fallback: Executor | None = None,
        trainer: dict[str, Any] | None = None,
        batched_group: int | None = None,
        across_architectures: bool = True,
    ) -> None:
        trainer = dict(trainer or {})
        check_batched(trainer)
        self.device = torch.device(device)
        self.batched_group = batched_group if batched_group is not None else (1 if self.device.type == "cpu" else None)
        if self.batched_group is not None and self.batched_group < 1:
            raise ValueError(f"batched_group must be a positive number of clients, got {batched_group}")
        self.fallback = fallback or SequentialExecutor({"accelerator": "cpu"} if self.device.type == "cpu" else {})
        self.autocast = str(trainer.get("precision")) in ("bf16-mixed", "bf16")
        self.rules = StepRules.from_trainer(trainer)
        self.index = Indices(self.device)
        self.key = group_key if across_architectures else architecture_key

    def groups(self, jobs: Sequence[FitJob]) -> tuple[list[list[int]], list[int]]:
        """Which jobs train stacked together (each list at most ``batched_group`` long), and which alone
        with the fallback executor (clients that are not batchable); positions in ``jobs``."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        sequential = []
        for index, job in enumerate(jobs):
            if job.client.batchable:
                groups.setdefault(self.key(job.client), []).append(index)
            else:
                sequential.append(index)
        size = self.batched_group or len(jobs)
        return [group[i : i + size] for group in groups.values() for i in range(0, len(group), size)], sequential

    def fit(self, jobs: Sequence[FitJob]) -> Iterator[FitOutcome]:
        outcomes: dict[int, FitOutcome] = {}
        stacked, sequential = self.groups(jobs)
        for members in stacked:
            for index, outcome in zip(members, self._fit_group([jobs[i] for i in members])):
                outcomes[index] = outcome
        for index, outcome in zip(sequential, self.fallback.fit([jobs[i] for i in sequential])):
            outcomes[index] = outcome
        for index in range(len(jobs)):
            yield outcomes[index]

    def round_stats(self) -> dict[str, Any]:
        return self.fallback.round_stats()

    # -- one group ------------------------------------------------------------------------------

    def _fit_group(self, jobs: list[FitJob]) -> list[FitOutcome]:
        clients = [job.client for job in jobs]
        try:
            batches = [JobBatches(job, self.device) for job in jobs]
            if len(jobs) == 1:
                losses, states = self._train_one(clients[0], batches[0])
            else:
                losses, states = self._train(clients, batches)
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
        for job, client, loss, state in zip(jobs, clients, losses, states):
            if (error := diverged(loss)) is not None:
                outcomes.append(FitOutcome(client.client_id, error=error))
                continue
            _write_back(client, state)
            result = ClientResult(client.client_id, client.upload(), job.data.num_train, {"train_loss": loss})
            outcomes.append(FitOutcome(client.client_id, result=result))
        return outcomes

    def _plan(self, clients: list[FederatedClient]) -> _Plan:
        """Stack a group's tensors (copies): one stack, or common parts plus one stack per architecture."""
        architectures: dict[tuple[Any, ...], list[int]] = {}
        for k, client in enumerate(clients):
            architectures.setdefault(architecture_key(client), []).append(k)
        everyone = list(range(len(clients)))
        if len(architectures) == 1 or not clients[0].stacked_across:  # (groups never mix architectures then)
            return _Plan(self._stack(clients, everyone, None), self._shell(_Loss, clients[0]), [])
        own = [(self._stack(clients, ks, False), self._shell(_Own, clients[ks[0]])) for ks in architectures.values()]
        return _Plan(self._stack(clients, everyone, True), self._shell(_Common, clients[0]), own)

    def _shell(self, wrapper: type[nn.Module], client: FederatedClient) -> nn.Module:
        return wrapper(copy.deepcopy(client)).to(self.device).train()

    def _stack(self, clients: list[FederatedClient], members: list[int], common: bool | None) -> _Stack:
        chosen = _chosen(clients[members[0]], common)

        def stacked(named: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
            return {
                PREFIX + name: torch.stack([tensors[name].detach() for tensors in named]).to(self.device)
                for name in named[0]
                if chosen(name)
            }

        params = stacked([dict(clients[k].named_parameters()) for k in members])
        buffers = stacked([dict(clients[k].named_buffers()) for k in members])
        for p in params.values():
            p.requires_grad_(True)
        lr, weight_decay, momentum = self._sgd_settings(clients[members[0]])
        sgd = StackedSGD(params, {name: lr[name] for name in params}, weight_decay, momentum)
        return _Stack(members, params, buffers, sgd)

    def _train(
        self, clients: list[FederatedClient], batches: list[JobBatches]
    ) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
        """Momentum SGD on a group's stacked clients over their batches.

        Returns each client's mean loss over its last epoch (as a Trainer fit reports it), and its
        trained parameters and buffers.
        """
        plan = self._plan(clients)
        count = len(clients)
        steps = [b.total for b in batches]
        per_epoch = [max(b.per_epoch, 1) for b in batches]
        last_epoch = [b.total - b.per_epoch for b in batches]  # the first step of each client's last epoch
        streams = [iter(b) for b in batches]
        loss_sum = torch.zeros(count, device=self.device)
        for t in range(max(steps, default=0)):
            buckets: dict[int, list[int]] = {}
            current: dict[int, Batch] = {}
            for k in range(count):
                if t < steps[k]:
                    current[k] = next(streams[k])
                    buckets.setdefault(len(current[k][1]), []).append(k)
            for members in buckets.values():
                x = torch.stack([current[k][0] for k in members])  # (G', B, C, H, W)
                y = torch.stack([current[k][1] for k in members])  # (G', B)
                stepping = [k for k in members if self.rules.steps_after(t % per_epoch[k], per_epoch[k])]
                losses = self._step(plan, members, stepping, x, y)  # (G',)
                counted = [i for i, k in enumerate(members) if t >= last_epoch[k]]
                if counted:
                    at = self.index(counted, len(members))
                    picked = losses if at is None else losses.index_select(0, at)
                    into = self.index([members[i] for i in counted], count)
                    loss_sum = loss_sum + picked if into is None else loss_sum.index_add(0, into, picked)
        means = (loss_sum.cpu() / torch.tensor(per_epoch)).tolist()
        states: list[dict[str, torch.Tensor]] = [{} for _ in clients]
        for stack in plan.stacks:
            for r, k in enumerate(stack.members):
                for name, value in {**stack.params, **stack.buffers}.items():
                    states[k][name.removeprefix(PREFIX)] = value[r].detach()
        return means, states

    def _step(
        self, plan: _Plan, members: list[int], stepping: list[int], x: torch.Tensor, y: torch.Tensor
    ) -> torch.Tensor:
        """Gradients of the listed clients' batch (group positions ``members``, their batches stacked
        in ``x``, ``y``); an SGD step for those in ``stepping`` (all of them without accumulation).
        Returns the members' losses, shape (G',)."""
        rules = self.rules
        # Per stack taking part: its clients in this bucket, their rows, parameters and buffers.
        chosen: list[tuple[_Stack, list[int], torch.Tensor | None, dict[str, torch.Tensor], dict[str, torch.Tensor]]]
        chosen = []

        def select(stack: _Stack, positions: list[int]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
            rows = self.index(stack.rows(positions), len(stack.members))
            p = stack.params if rows is None else {n: v.index_select(0, rows) for n, v in stack.params.items()}
            b = stack.buffers if rows is None else {n: v.index_select(0, rows) for n, v in stack.buffers.items()}
            chosen.append((stack, positions, rows, p, b))
            return p, b

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            p, b = select(plan.common, members)
            if not plan.own:
                losses = vmap(lambda p_, b_, x_, y_: functional_call(plan.shell, (p_, b_), (x_, y_)))(p, b, x, y)
            else:
                common = vmap(lambda p_, b_, x_: functional_call(plan.shell, (p_, b_), (x_,)))(p, b, x)
                parts, order = [], []
                for stack, shell in plan.own:
                    positions = [i for i, k in enumerate(members) if k in stack.row]  # in the bucket
                    if not positions:
                        continue
                    mine = [members[i] for i in positions]
                    at = self.index(positions, len(members))
                    po, bo = select(stack, mine)
                    c, xs, ys = (tuple(_take(t, at) for t in common), _take(x, at), _take(y, at))
                    parts.append(
                        vmap(lambda p_, b_, c_, x_, y_, s=shell: functional_call(s, (p_, b_), (c_, x_, y_)))(
                            po, bo, c, xs, ys
                        )
                    )
                    order += positions
                joined = torch.cat(parts)
                back = self.index(sorted(range(len(order)), key=order.__getitem__), len(order))
                losses = joined if back is None else joined.index_select(0, back)  # in ``members`` order
        scaled = (losses / rules.accumulate).sum() if rules.accumulate > 1 else losses.sum()
        tensors = [t for _, _, _, p, _ in chosen for t in p.values()]
        flat: list[torch.Tensor | None] = list(torch.autograd.grad(scaled, tensors, allow_unused=True))
        with torch.no_grad():
            steps: list[tuple[_Stack, torch.Tensor | None, list[torch.Tensor | None], list[int]]] = []
            for stack, positions, rows, p, b in chosen:
                grads, flat = flat[: len(p)], flat[len(p) :]
                if rows is not None:
                    for name, value in b.items():
                        stack.buffers[name].index_copy_(0, rows, value)
                if rules.accumulate == 1:
                    steps.append((stack, rows, grads, positions))
                    continue
                for i, g in enumerate(grads):
                    if g is None:
                        continue
                    if stack.accumulated[i] is None:
                        stack.accumulated[i] = torch.zeros_like(stack.sgd.params[i])
                    acc = stack.accumulated[i]
                    assert acc is not None
                    acc.add_(g) if rows is None else acc.index_add_(0, rows, g)
                due = [k for k in stepping if k in stack.row]
                if not due:
                    continue
                at = self.index(stack.rows(due), len(stack.members))
                summed = [
                    None if a is None else a.clone() if at is None else a.index_select(0, at) for a in stack.accumulated
                ]
                for a in stack.accumulated:
                    if a is not None:
                        a.zero_() if at is None else a.index_fill_(0, at, 0.0)
                steps.append((stack, at, summed, due))
            if rules.clip_val is not None and steps:
                everyone = {k: i for i, k in enumerate(sorted({k for _, _, _, due in steps for k in due}))}
                clip_stacked(
                    [(grads, self.index([everyone[k] for k in due], len(everyone))) for _, _, grads, due in steps],
                    len(everyone),
                    rules,
                )
            for stack, at, grads, _ in steps:
                stack.sgd.step(grads, at)
        return losses.detach().float()

    def _train_one(
        self, client: FederatedClient, batches: JobBatches
    ) -> tuple[list[float], list[dict[str, torch.Tensor]]]:
        """A group of one: the client's own step, op for op (accumulation and clipping included), on a
        copy of the client, with no stacking or functional call."""
        wrapped = self._shell(_Loss, client)
        copied = wrapped.client
        assert isinstance(copied, FederatedClient)
        params: dict[str, torch.Tensor] = dict(wrapped.named_parameters())
        tensors = list(params.values())
        # Clipping sees the parameters in the order of the client's optimizer, as Lightning's does.
        order = {id(p): i for i, p in enumerate(p for g in copied.param_groups() for p in g["params"])}
        clip_order = sorted(tensors, key=lambda p: order.get(id(p), len(order)))
        lr, weight_decay, momentum = self._sgd_settings(client)
        sgd = StackedSGD(params, lr, weight_decay, momentum)
        rules, per_epoch, last_epoch = self.rules, max(batches.per_epoch, 1), batches.total - batches.per_epoch
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
        state = {n.removeprefix(PREFIX): t.detach() for n, t in {**params, **dict(wrapped.named_buffers())}.items()}
        return [float(loss_sum) / per_epoch], [state]

    @staticmethod
    def _sgd_settings(client: FederatedClient) -> tuple[dict[str, float], float, float]:
        """Per-parameter learning rates (from ``param_groups``), weight decay and momentum of a client's SGD."""
        cfg = client.config
        by_id = {}
        for group in client.param_groups():
            for param in group["params"]:
                by_id[id(param)] = group.get("lr", cfg.lr)
        lr = {PREFIX + name: by_id[id(p)] for name, p in client.named_parameters()}
        return lr, cfg.weight_decay, cfg.momentum


def _take(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The given rows of a stacked tensor (all of them for None)."""
    return t if rows is None else t.index_select(0, rows)


def _write_back(client: FederatedClient, tensors: dict[str, torch.Tensor]) -> None:
    """Copy trained tensors into a client's own parameters and buffers (non-persistent ones and
    modules registered under two names included: each tensor is written once, in place)."""
    parameters = dict(client.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            target = parameters[name] if name in parameters else client.get_buffer(name)
            target.copy_(t)
