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
statistics are). Other clients of the round go to the sequential executor.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from fedmoe_pl.algorithms import ClientResult, FederatedClient
from fedmoe_pl.executor import Executor, FitJob, FitOutcome, SequentialExecutor

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
    data.shuffle_seed = job.seed
    loader = data.train_dataloader()  # seeds the shuffling and the augmentation of this fit
    return [
        data.prepare_batch((x.to(device), y.to(device)), training=True) for _ in range(job.epochs) for x, y in loader
    ]


class BatchedExecutor:
    """Trains each architecture group of a round's batchable clients together (see the module docstring).

    Args:
        device: where the stacked clients train.
        fallback: the executor of clients that are not batchable (default: one Trainer each).
        precision: ``"bf16-mixed"`` runs the forward pass under bfloat16 autocast; anything else in fp32.
    """

    def __init__(self, device: torch.device | str = "cpu", fallback: Executor | None = None, precision: Any = None):
        self.device = torch.device(device)
        self.fallback = fallback or SequentialExecutor({"accelerator": "cpu"} if self.device.type == "cpu" else {})
        self.autocast = str(precision) in ("bf16-mixed", "bf16")

    def fit(self, jobs: Sequence[FitJob]) -> Iterator[FitOutcome]:
        outcomes: dict[int, FitOutcome] = {}
        groups: dict[tuple[Any, ...], list[int]] = {}
        sequential = []
        for index, job in enumerate(jobs):
            if getattr(job.client, "batchable", False):
                groups.setdefault(group_key(job.client), []).append(index)
            else:
                sequential.append(index)
        for members in groups.values():
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
            return [FitOutcome(c.client_id, error=err) for c in clients]
        outcomes = []
        for k, (job, client) in enumerate(zip(jobs, clients)):
            loss = losses[k]
            if not math.isfinite(loss):
                diverged = FloatingPointError(f"the training loss is {loss}; lower client.lr or check the data")
                outcomes.append(FitOutcome(client.client_id, error=diverged))
                continue
            state = {name.removeprefix("client."): t[k].cpu() for name, t in {**params, **buffers}.items()}
            client.load_state_dict(state)
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
        shell = _Loss(copy.deepcopy(clients[0])).to(self.device).train()
        stacked_params, stacked_buffers = stack_module_state([_Loss(c) for c in clients])  # copies
        params = {name: p.detach().to(self.device) for name, p in stacked_params.items()}
        buffers = {name: b.to(self.device) for name, b in stacked_buffers.items()}
        lr, weight_decay, momentum = self._sgd_settings(clients[0])
        velocity: dict[str, torch.Tensor] = {}
        loss_sum = torch.zeros(len(clients), device=self.device)
        steps = [len(b) for b in batches]
        last_epoch = [s - s // e for s, e in zip(steps, epochs)]  # the first step of each client's last epoch
        for t in range(max(steps, default=0)):
            buckets: dict[int, list[int]] = {}
            for k in range(len(clients)):
                if t < steps[k]:
                    buckets.setdefault(len(batches[k][t][1]), []).append(k)
            for members in buckets.values():
                x = torch.stack([batches[k][t][0] for k in members])  # (G, B, C, H, W)
                y = torch.stack([batches[k][t][1] for k in members])  # (G, B)
                losses = self._step(shell, params, buffers, velocity, members, t, x, y, lr, weight_decay, momentum)
                counted = [k for k in members if t >= last_epoch[k]]
                loss_sum[counted] += losses[counted]
        means = (loss_sum.cpu() / torch.tensor([max(s // e, 1) for s, e in zip(steps, epochs)])).tolist()
        return means, params, buffers

    def _step(
        self,
        shell: nn.Module,
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        velocity: dict[str, torch.Tensor],
        members: list[int],
        t: int,
        x: torch.Tensor,
        y: torch.Tensor,
        lr: dict[str, float],
        weight_decay: float,
        momentum: float,
    ) -> torch.Tensor:
        """One SGD step of the listed clients; returns their losses scattered into a (G,) vector."""
        count = next(iter(params.values())).shape[0]
        whole = len(members) == count
        index = torch.tensor(members, device=self.device)

        def take(t_: torch.Tensor) -> torch.Tensor:
            return t_ if whole else t_.index_select(0, index)

        p = {name: take(v).clone().requires_grad_(True) for name, v in params.items()}
        b = {name: take(v).clone() for name, v in buffers.items()}

        def loss_of(p_: dict[str, torch.Tensor], b_: dict[str, torch.Tensor], x_: torch.Tensor, y_: torch.Tensor):  # type: ignore[no-untyped-def]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                return functional_call(shell, (p_, b_), (x_, y_))

        losses = vmap(loss_of)(p, b, x, y)  # (G',)
        losses.sum().backward()
        with torch.no_grad():
            for name, value in p.items():
                grad = value.grad if value.grad is not None else torch.zeros_like(value)
                d = grad.add(value, alpha=weight_decay) if weight_decay else grad
                if momentum:
                    buf = d.clone() if t == 0 else take(velocity[name]).mul(momentum).add_(d)
                    d = buf
                    if name not in velocity:
                        velocity[name] = torch.zeros_like(params[name])
                    _put(velocity[name], index, buf, whole)
                _put(params[name], index, value.detach().add(d, alpha=-lr[name]), whole)
            for name, value in b.items():
                _put(buffers[name], index, value, whole)
        out = torch.zeros(count, device=self.device)
        out[index] = losses.detach().float()
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


def _put(target: torch.Tensor, index: torch.Tensor, value: torch.Tensor, whole: bool) -> None:
    if whole:
        target.copy_(value)
    else:
        target.index_copy_(0, index, value)
