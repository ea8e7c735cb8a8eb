"""Server-side arithmetic: pure functions over ``dict[str, Tensor]`` payloads."""

from __future__ import annotations

from collections.abc import Sequence

import torch

Payload = dict[str, torch.Tensor]


def payload_bytes(payload: Payload) -> int:
    """Bytes a payload takes on the wire (raw tensor storage, no framing)."""
    return sum(t.numel() * t.element_size() for t in payload.values())


def payload_numel(payload: Payload) -> int:
    return sum(t.numel() for t in payload.values())


def weighted_mean(payloads: Sequence[Payload], weights: Sequence[float]) -> Payload:
    """Average payloads key by key, client i weighing ``weights[i]`` (its sample count).

    Floating tensors get the weighted mean in float64, cast back to their dtype. Integer tensors
    are counters such as BatchNorm's ``num_batches_tracked``: averaging them is meaningless and
    would truncate, so they take the maximum, i.e. the most advanced counter.
    """
    if not payloads:
        raise ValueError("weighted_mean needs at least one payload")
    if len(payloads) != len(weights):
        raise ValueError(f"{len(payloads)} payloads but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError(f"weights must sum to a positive number, got {list(weights)}")
    keys = payloads[0].keys()
    for i, p in enumerate(payloads[1:], start=1):
        if p.keys() != keys:
            raise ValueError(f"payload {i} has keys {sorted(p)} but payload 0 has {sorted(keys)}")
    out: Payload = {}
    for key in keys:
        first = payloads[0][key]
        if first.is_floating_point():
            acc = torch.zeros_like(first, dtype=torch.float64)
            for p, w in zip(payloads, weights):
                acc.add_(p[key].to(torch.float64), alpha=w / total)
            out[key] = acc.to(first.dtype)
        else:
            out[key] = torch.stack([p[key] for p in payloads]).amax(0)
    return out


def classwise_mean(sums: Sequence[torch.Tensor], counts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine per-class statistics of many clients.

    Args:
        sums: per client (classes, D) per-class means.
        counts: per client (classes,) how many samples each mean summarizes.

    Returns:
        (classes, D) sample-weighted means over clients (zero for unseen classes) and the
        (classes,) total counts.
    """
    total = torch.stack([c.to(torch.float64) for c in counts]).sum(0)  # (K,)
    acc = sum(m.to(torch.float64) * c.to(torch.float64)[:, None] for m, c in zip(sums, counts))
    mean = acc / total.clamp(min=1)[:, None]  # (K, D)
    return mean.to(sums[0].dtype), total
