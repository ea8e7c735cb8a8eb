"""Training cost in FLOPs, counted by PyTorch (``torch.utils.flop_counter``), not by formula.

A client's cost per training sample is one forward and backward pass of its own training loss
(every model it trains, the gate, the losses) on two of its samples, divided by two. It is
counted once per architecture on a copy of the client, so nothing of the client changes.
"""

from __future__ import annotations

import copy

import torch
from torch.utils.flop_counter import FlopCounterMode

from fedmoe_pl.algorithms import FederatedClient
from fedmoe_pl.data import ClientDataModule

PROBE_SAMPLES = 2  # batch-statistics layers need more than one sample in training mode


def training_flops_per_sample(client: FederatedClient, data: ClientDataModule) -> float:
    """FLOPs of the forward and backward pass of ``client``'s training loss, per sample."""
    if data.num_train == 0:
        return 0.0
    probe = copy.deepcopy(client)
    probe.train()
    device = next(probe.parameters()).device
    images = data.train_images[:PROBE_SAMPLES].to(device)
    labels = data.train_labels[:PROBE_SAMPLES].to(device)
    x = data.eval_transform(images)  # augmentation changes no FLOP count
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), FlopCounterMode(display=False) as counter:
        probe.training_loss(x, labels).backward()
    return counter.get_total_flops() / len(labels)
