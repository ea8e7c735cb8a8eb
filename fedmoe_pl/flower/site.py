"""What a node does with a message: its client and data shard, built once per process, and the
handling of ``train`` and ``evaluate`` (see :mod:`fedmoe_pl.flower.client` for the protocol).

This module imports torch and Lightning; it runs in the process that serves the node's messages
(the ClientApp itself, or the node's resident worker, :mod:`fedmoe_pl.flower.resident`).
"""

from __future__ import annotations

import copy
import json
import shlex
from dataclasses import dataclass

import torch
from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict

from fedmoe_pl.algorithms import FederatedClient
from fedmoe_pl.analysis.evaluation import Evaluator
from fedmoe_pl.data import ClientDataModule
from fedmoe_pl.fleets.executor import FitJob, SequentialExecutor
from fedmoe_pl.flower.client import BEFORE_FIT, FITS, STATE, partition_id
from fedmoe_pl.flower.wire import LINK, REPORT, UPLOAD, number, take_instructions, to_record
from fedmoe_pl.run.experiment import Experiment, training_device


@dataclass
class Site:
    """One node's part of the federation for one message: its client and its data shard."""

    exp: Experiment
    client: FederatedClient
    shard: ClientDataModule
    fits: int  # the client's fits the server accepted
    opened: dict[str, torch.Tensor]  # the client's state when the message arrived

    @classmethod
    def open(cls, context: Context, content: RecordDict) -> Site:
        exp, pristine, initial = _built(str(context.run_config["fit-args"]), partition_id(context))
        client = copy.deepcopy(pristine)  # nothing of an earlier message survives but the state below
        cid = client.client_id
        kept = int(number(context.state.config_records[FITS], "fits")) if FITS in context.state.config_records else 0
        accepted = int(number(content.config_records[LINK], "fits")) if LINK in content.config_records else kept
        records = context.state.array_records
        if kept == accepted + 1 and BEFORE_FIT in records:  # a late fit the server discarded
            client.load_state_dict(records[BEFORE_FIT].to_torch_state_dict())
        elif kept != accepted:
            raise RuntimeError(
                f"client {cid} has kept {kept} fits but the server accepted {accepted}; the node's state "
                "is not the server's (restart the run)"
            )
        elif STATE in records:
            client.load_state_dict(records[STATE].to_torch_state_dict())
        else:  # the first message: the client's initial weights
            client.load_state_dict(initial)
        return cls(exp, client, exp.data.clients[cid], accepted, {k: v.clone() for k, v in client.state_dict().items()})

    def apply(self, content: RecordDict) -> int:
        """Apply the message's instructions in order; return the bytes of state they carried."""
        instructions, received = take_instructions(content)
        for instruction in instructions:
            if instruction.payload is not None:
                self.client.download(instruction.payload)
            self.client.configure_round(**instruction.settings)
        return received

    def save(self, context: Context, fitted: bool = False) -> None:
        """Keep the client's state on the node; after a fit, also the state before it (for a rollback)."""
        context.state[STATE] = to_record(self.client.state_dict())
        if fitted:
            context.state[BEFORE_FIT] = to_record(self.opened)
        context.state[FITS] = ConfigRecord({"fits": self.fits + int(fitted)})


_BUILT: dict[tuple[str, int], tuple[Experiment, FederatedClient, dict[str, torch.Tensor]]] = {}


def _built(fit_args: str, cid: int) -> tuple[Experiment, FederatedClient, dict[str, torch.Tensor]]:
    """The run's experiment, this node's client as built and its initial state, made once per
    process: the config read, the data partitioned as a simulation does, and only client ``cid``
    built (its weights are a pure function of the run's seed and its id). The client's state
    between messages lives in the node's context, never in this cache."""
    key = (fit_args, cid)
    if key not in _BUILT:
        from fedmoe_pl.cli import experiment_from_args
        from fedmoe_pl.fleets.executor import quiet_lightning
        from fedmoe_pl.fleets.in_process import client_builder

        quiet_lightning()
        exp = experiment_from_args(shlex.split(fit_args))
        if not 0 <= cid < exp.data.num_clients:
            raise ValueError(f"partition-id {cid} is outside 0 .. {exp.data.num_clients - 1} (data.num_clients)")
        exp.data.setup(exp.seed)
        client = client_builder(exp.algorithm, exp.client, exp.data, exp.seed)(cid)
        _BUILT.clear()  # one run at a time in a process
        _BUILT[key] = (exp, client, {k: v.clone() for k, v in client.state_dict().items()})
    return _BUILT[key]


def train(content: RecordDict, context: Context) -> RecordDict:
    """Apply the pending instructions, fit once; the reply's content (the upload and a report)."""
    site = Site.open(context, content)
    received = site.apply(content)
    fit = content.config_records["fit"]
    job = FitJob(site.client, site.shard, seed=int(number(fit, "seed")), epochs=int(number(fit, "epochs")))
    outcome = next(iter(SequentialExecutor(site.exp.trainer).fit([job])))
    if outcome.error is not None:
        raise outcome.error  # Flower replies with the error; the node keeps the client's state from before
    assert outcome.result is not None
    site.save(context, fitted=True)
    report = MetricRecord(
        {
            "num_samples": outcome.result.num_samples,
            "train_loss": outcome.result.metrics["train_loss"],
            "bytes_received": received,
        }
    )
    return RecordDict({UPLOAD: to_record(outcome.result.upload), REPORT: report})


def evaluate(content: RecordDict, context: Context) -> RecordDict:
    """Apply the pending instructions and, if asked, score the client on its test shard."""
    site = Site.open(context, content)
    received = site.apply(content)
    site.save(context)
    asked = content.config_records["evaluate"]
    reply = RecordDict({REPORT: MetricRecord({"bytes_received": received})})
    if bool(asked["score"]):
        evaluator = Evaluator(training_device(site.exp.trainer))
        scores = evaluator.score_client(site.client, site.shard, site.exp.data.num_classes, bool(asked["confusion"]))
        reply["scores"] = ConfigRecord({"json": json.dumps(scores)})
    return reply


HANDLERS = {"train": train, "evaluate": evaluate}
