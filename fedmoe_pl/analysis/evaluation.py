"""Evaluation: each client's model on its own test set, scored with torchmetrics in this one place.

Per client: accuracy, per-class accuracy (the classes in its test set) and, in the last round,
a confusion matrix, and balanced accuracy (the mean of the per-class accuracies). Over clients: mean,
sample-weighted mean, std and minimum, and the mean balanced accuracy; clients with an
empty test shard are left out of every average and listed. For a method whose clients report
per-sample gate weights (an extra named ``gate_*``, as pFedMoE's weight on the global expert),
the weights are summarised per (client, class) — mean and quantiles — and as a histogram, with
the spread within each client telling an input-dependent gate from a collapsed one.

A client may also report numbers of its model itself (:meth:`FederatedClient.diagnostics`, such as
pFedMoE's Switchable-Norm mixing weights), recorded per client under their own names.

A round's fields (:func:`summarize`) put the averages at the top level and the rest in the record's
sections (:mod:`fedmoe_pl.run.rundir`): ``client_acc`` and ``<gate>_spread`` per client,
``client_class_acc`` and ``<gate>_class_{mean,q10,q50,q90}`` per client and class, and ``<gate>``
among the histograms.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix, multiclass_stat_scores

from fedmoe_pl.algorithms import FederatedClient
from fedmoe_pl.data import ClientDataModule
from fedmoe_pl.run.rundir import HISTOGRAMS, PER_CLIENT, PER_CLIENT_CLASS

GATE_BINS = 10  # histogram bins over [0, 1]
QUANTILES = (0.1, 0.5, 0.9)
COLLAPSED_STD = 0.01  # a gate whose weights vary less than this within a client is called collapsed
GATE_STAT_KIND = {"hist": HISTOGRAMS, "spread": PER_CLIENT}  # the record's section of a gate statistic


def _r(value: float | torch.Tensor) -> float:
    return round(float(value), 4)  # metrics.jsonl stays compact


class Evaluator:
    """Scores clients on their test shards; see the module docstring for what it reports.

    Runs outside a Trainer (a plain inference loop per client), which keeps the per-round cost low.

    Args:
        device: where to evaluate; the experiment passes the device its Trainers train on.
        enabled: False scores nothing (the ranks of a multi-process run other than the one that
            writes the metrics).
    """

    def __init__(self, device: torch.device | str = "cpu", enabled: bool = True) -> None:
        self.device = torch.device(device)
        self.enabled = enabled

    @torch.inference_mode()
    def predict(
        self, client: FederatedClient, shard: ClientDataModule
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Predicted labels, true labels and per-sample extras over the client's whole test set."""
        was_training = client.training
        client.to(self.device).eval()
        preds: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        extras: dict[str, list[torch.Tensor]] = {}
        try:
            for x, y in shard.eval_batches(self.device):
                logits, more = client.predict_with_extras(x)
                preds.append(logits.argmax(1))
                labels.append(y)
                for key, value in more.items():
                    extras.setdefault(key, []).append(value.float())
        finally:
            client.train(was_training).to("cpu")
        return torch.cat(preds), torch.cat(labels), {k: torch.cat(v) for k, v in extras.items()}

    def __call__(
        self,
        clients: Iterable[FederatedClient],
        data: Iterable[ClientDataModule],
        num_classes: int,
        confusion: bool = False,
    ) -> dict[str, Any]:
        if not self.enabled:
            return {}
        scores: dict[int, dict[str, Any] | None] = {}
        for client, shard in zip(clients, data):
            scores[client.client_id] = self.score_client(client, shard, num_classes, confusion)
        return summarize(scores, num_classes, confusion)

    def score_client(
        self, client: FederatedClient, shard: ClientDataModule, num_classes: int, confusion: bool = False
    ) -> dict[str, Any] | None:
        """One client's scores (:func:`score`) with its test-set size ``n`` and, if asked, its confusion
        matrix; None for a client without test samples."""
        if shard.num_test == 0:
            return None
        preds, labels, extras = self.predict(client, shard)
        diagnostics = getattr(client, "diagnostics", None)  # a scored module need not be a FederatedClient
        model = diagnostics() if callable(diagnostics) else {}
        out = {**score(preds, labels, extras, num_classes), "n": len(labels), "model": model}
        if confusion:
            out["confusion"] = multiclass_confusion_matrix(preds, labels, num_classes).cpu().tolist()
        return out


def summarize(scores: dict[int, dict[str, Any] | None], num_classes: int, confusion: bool = False) -> dict[str, Any]:
    """A round's evaluation fields from each client's :meth:`Evaluator.score_client` (None: no test samples).

    Wherever the scores were computed (here, or by clients in other processes), the fields are the same.
    """
    per_client = {cid: s for cid, s in scores.items() if s is not None}
    out: dict[str, Any] = {"mean_acc": None, "no_test_clients": [cid for cid, s in scores.items() if s is None]}
    if not per_client:
        return out
    ids = sorted(per_client)
    accs = np.array([per_client[cid]["acc"] for cid in ids])
    counts = np.array([per_client[cid]["n"] for cid in ids])
    # Balanced accuracy: the mean of a client's per-class accuracies over the classes in its test set,
    # which a client whose labels are imbalanced cannot raise by predicting its majority class.
    balanced = np.array([_balanced(per_client[cid]) for cid in ids])
    out.update(
        mean_acc=float(accs.mean()),
        weighted_acc=float((accs * counts).sum() / counts.sum()),
        std_acc=float(accs.std()),
        min_acc=float(accs.min()),
        mean_balanced_acc=float(balanced.mean()),
    )
    sections: dict[str, dict[str, Any]] = {
        PER_CLIENT: {
            "client_acc": {str(cid): per_client[cid]["acc"] for cid in ids},
            "client_balanced_acc": {str(cid): float(b) for cid, b in zip(ids, balanced)},
        },
        PER_CLIENT_CLASS: {"client_class_acc": {str(cid): per_client[cid]["class_acc"] for cid in ids}},
        HISTOGRAMS: {},
    }
    for key in sorted({k for cid in ids for k in per_client[cid].get("model", {})}):
        sections[PER_CLIENT][key] = {
            str(c): _r(per_client[c]["model"][key]) for c in ids if key in per_client[c]["model"]
        }
    for key in sorted({k for cid in ids for k in per_client[cid]["means"]}):
        means = {str(c): per_client[c]["means"][key] for c in ids if key in per_client[c]["means"]}
        sections[PER_CLIENT][f"client_{key}"] = means
    for gate in sorted({g for cid in ids for g in per_client[cid]["gate"]}):
        scored = [c for c in ids if gate in per_client[c]["gate"]]
        for stat in per_client[scored[0]]["gate"][gate]:
            values = {str(c): per_client[c]["gate"][gate][stat] for c in scored}
            kind = GATE_STAT_KIND.get(stat, PER_CLIENT_CLASS)
            sections[kind][gate if kind == HISTOGRAMS else f"{gate}_{stat}"] = values
        spread = sections[PER_CLIENT][f"{gate}_spread"]
        out[f"{gate}_collapsed"] = [int(c) for c, v in spread.items() if v < COLLAPSED_STD]
    out.update({kind: section for kind, section in sections.items() if section})
    if confusion:
        matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)
        for cid in ids:
            matrix += torch.tensor(per_client[cid]["confusion"], dtype=torch.long)
        out["confusion"] = matrix.tolist()
    return out


def _balanced(scores: dict[str, Any]) -> float:
    """A client's mean per-class accuracy (its accuracy where per-class accuracies are missing)."""
    per_class = list(scores.get("class_acc", {}).values())
    return float(np.mean(per_class)) if per_class else float(scores["acc"])


def with_forgetting(scores: dict[str, Any], earlier: dict[str, Any]) -> dict[str, Any]:
    """A round's evaluation fields (:func:`summarize`) with the scores of the same clients on the data
    they held before the latest drift: ``mean_acc_before_drift`` and, per client,
    ``client_acc_before_drift``."""
    out = {**scores, "mean_acc_before_drift": earlier["mean_acc"]}
    if PER_CLIENT in earlier:
        out[PER_CLIENT] = {**scores.get(PER_CLIENT, {}), "client_acc_before_drift": earlier[PER_CLIENT]["client_acc"]}
    return out


def score(
    preds: torch.Tensor, labels: torch.Tensor, extras: dict[str, torch.Tensor], num_classes: int
) -> dict[str, Any]:
    """One client's scores: accuracy, per-class accuracy, means of extras, gate analytics."""
    # Per-class counts from torchmetrics (tp, fp, tn, fn, support), divided in float64: exactly
    # the hand count. Overall accuracy is the summed true positives over the summed support.
    per_class = multiclass_stat_scores(preds, labels, num_classes, average="none").tolist()  # (C, 5)
    present = [c for c in range(num_classes) if per_class[c][4] > 0]
    out: dict[str, Any] = {
        "acc": sum(per_class[c][0] for c in present) / len(labels),
        "class_acc": {str(c): per_class[c][0] / per_class[c][4] for c in present},
        "means": {key: float(values.mean()) for key, values in extras.items()},
        "gate": {},
    }
    for key, values in extras.items():
        if key.startswith("gate"):
            out["gate"][key] = gate_analytics(values, labels, present)
    return out


def gate_analytics(weights: torch.Tensor, labels: torch.Tensor, present: list[int]) -> dict[str, Any]:
    """One client's gate weights: per class, mean and quantiles (``class_mean``, ``class_q10``, ...);
    a histogram over [0, 1] (``hist``) and the spread within the client (``spread``). In a round's
    record, ``<gate>_<stat>`` in the section :data:`GATE_STAT_KIND` names (per client and class if none),
    and the histogram under the gate's own name."""
    w = weights.double().cpu()
    y = labels.cpu()
    q = torch.tensor(QUANTILES, dtype=torch.double)
    out: dict[str, Any] = {"class_mean": {}, **{f"class_q{int(p * 100)}": {} for p in QUANTILES}}
    for c in present:
        wc = w[y == c]
        out["class_mean"][str(c)] = _r(wc.mean())
        for p, value in zip(QUANTILES, torch.quantile(wc, q)):
            out[f"class_q{int(p * 100)}"][str(c)] = _r(value)
    out["hist"] = torch.histc(w.clamp(0, 1), bins=GATE_BINS, min=0, max=1).long().tolist()
    out["spread"] = _r(w.std(unbiased=False))
    return out
