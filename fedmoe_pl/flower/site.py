"""What a node does with a message: its client and data shard, built once per process, and the
handling of ``train`` and ``evaluate`` (see :mod:`fedmoe_pl.flower.client` for the protocol).

This module imports torch and Lightning; it runs in the process that serves the node's messages
(the ClientApp itself, or the node's resident worker, :mod:`fedmoe_pl.flower.resident`).

The client's state lives in the node's context, which Flower keeps in the SuperNode's memory. With
the node config's ``state-dir`` it is also written there after every message (one file per run and
client, replaced whole), and a restarted SuperNode of the same ``partition-id`` picks it up again.
A node that finds no state for a client the server has already trained starts the client afresh
from its initial weights and says so in its reply (``reset``), so the server counts its fits anew.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, ConfigRecordValues, Context, MetricRecord, RecordDict

from fedmoe_pl.algorithms import FederatedClient
from fedmoe_pl.analysis.evaluation import Evaluator
from fedmoe_pl.data import ClientDataModule
from fedmoe_pl.fleets.executor import FitJob, SequentialExecutor
from fedmoe_pl.flower.client import BEFORE_FIT, FITS, STATE, partition_id
from fedmoe_pl.flower.wire import LINK, REPORT, UPLOAD, number, take_instructions, to_record
from fedmoe_pl.run.experiment import Experiment, training_device
from fedmoe_pl.run.rundir import fsync_directory

log = logging.getLogger(__name__)
STATE_DIR = "state-dir"  # node config: where the node keeps its client's state across restarts


@dataclass
class Site:
    """One node's part of the federation for one message: its client and its data shard in the
    message's round (a drifting run's shards change with the round)."""

    exp: Experiment
    client: FederatedClient
    fits: int  # the client's fits the server accepted
    opened: dict[str, torch.Tensor]  # the client's state when the message arrived
    stored: Path | None  # where the state is also kept on disk (the node config's state-dir), if anywhere
    reset: bool = False  # the node had no state for a client the server had trained: it started afresh

    @classmethod
    def open(cls, context: Context, content: RecordDict) -> Site:
        exp, pristine, initial = _built(str(context.run_config["fit-args"]), partition_id(context))
        client = copy.deepcopy(pristine)  # nothing of an earlier message survives but the state below
        cid = client.client_id
        stored = state_file(context, cid)
        if FITS not in context.state.config_records and stored is not None:
            _restore(context, stored)  # a restarted node: its client's state as the last message left it
        known = FITS in context.state.config_records
        kept = int(number(context.state.config_records[FITS], "fits")) if known else 0
        accepted = int(number(content.config_records[LINK], "fits")) if LINK in content.config_records else kept
        records = context.state.array_records
        if not known and accepted > 0:
            log.warning(
                "client %d: the server accepted %d of its fits, but this node has no state for it (a restarted "
                "node without %s in its node config); it starts again from its initial weights",
                cid,
                accepted,
                STATE_DIR,
            )
            client.load_state_dict(initial)
            return cls(exp, client, 0, _copy(client.state_dict()), stored, reset=True)
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
        return cls(exp, client, accepted, _copy(client.state_dict()), stored)

    def shard(self, round_: int) -> ClientDataModule:
        """The client's data in round ``round_``."""
        return self.exp.data.shards(round_)[self.client.client_id]

    def apply(self, content: RecordDict) -> int:
        """Apply the message's instructions in order; return the bytes of state they carried."""
        instructions, received = take_instructions(content)
        for instruction in instructions:
            if instruction.payload is not None:
                self.client.download(instruction.payload)
            self.client.configure_round(**instruction.settings)
        return received

    def save(self, context: Context, fitted: bool = False) -> None:
        """Keep the client's state on the node; after a fit, also the state before it (for a rollback).
        With a state-dir, the file is written first: if that fails, the message fails and the node
        keeps the state from before it, as the server does."""
        state = self.client.state_dict()
        fits = self.fits + int(fitted)
        if self.stored is not None:  # the file holds what the context will: the state before a fit kept there
            before = self.opened if fitted else _state(context, BEFORE_FIT)
            _store(self.stored, {"fits": fits, "state": state, "before_fit": before})
        context.state[STATE] = to_record(state)
        if fitted:
            context.state[BEFORE_FIT] = to_record(self.opened)
        context.state[FITS] = ConfigRecord({"fits": fits})

    def report(self, received: int) -> dict[str, int | float | list[int] | list[float]]:
        """What every reply tells the server: the bytes of state the message carried, and a reset."""
        return {"bytes_received": received, "reset": int(self.reset)}


def state_file(context: Context, cid: int) -> Path | None:
    """Where the node keeps client ``cid``'s state of this run on disk: only with the node config's
    ``state-dir``."""
    folder = context.node_config.get(STATE_DIR)
    if folder in (None, ""):
        return None
    return Path(str(folder)).expanduser() / f"run-{context.run_id}" / f"client-{cid}.pt"


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


def _state(context: Context, name: str) -> dict[str, torch.Tensor] | None:
    record = context.state.array_records.get(name)
    return None if record is None else record.to_torch_state_dict()


def _store(path: Path, kept: dict[str, Any]) -> None:
    """Write the client's state whole or not at all (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as fh:
            torch.save(kept, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(
            f"could not keep the client's state in {str(path)!r}: {err.strerror or err}; free space or fix the "
            f"permissions of the node's {STATE_DIR}, or start the SuperNode with another"
        ) from err


def _restore(context: Context, path: Path) -> None:
    """Put the client's state a previous SuperNode left in ``path`` into the node's context (nothing if
    there is no such file: the node's first message of the run)."""
    try:
        kept = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return
    except OSError as err:
        raise RuntimeError(
            f"could not read the client's state from {str(path)!r}: {err.strerror or err}; fix the node's "
            f"{STATE_DIR} (a folder this node can write) or start the SuperNode with another"
        ) from err
    except Exception as err:
        raise RuntimeError(
            f"{str(path)!r} does not hold a client's state ({err}); remove it to start the client afresh"
        ) from err
    context.state[STATE] = to_record(kept["state"])
    if kept.get("before_fit") is not None:
        context.state[BEFORE_FIT] = to_record(kept["before_fit"])
    context.state[FITS] = ConfigRecord({"fits": int(kept["fits"])})
    log.warning("client's state restored from %s (%d fits)", path, int(kept["fits"]))


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
    shard = site.shard(int(number(fit, "round")))
    job = FitJob(site.client, shard, seed=int(number(fit, "seed")), epochs=int(number(fit, "epochs")))
    outcome = next(iter(SequentialExecutor(site.exp.trainer).fit([job])))
    if outcome.error is not None:
        raise outcome.error  # Flower replies with the error; the node keeps the client's state from before
    assert outcome.result is not None
    site.save(context, fitted=True)
    report = MetricRecord(
        {
            "num_samples": outcome.result.num_samples,
            "train_loss": outcome.result.metrics["train_loss"],
            **site.report(received),
        }
    )
    return RecordDict({UPLOAD: to_record(outcome.result.upload), REPORT: report})


def evaluate(content: RecordDict, context: Context) -> RecordDict:
    """Apply the pending instructions and, if asked, score the client on its test shard of the round
    (after a drift, also on the one it held before the latest change)."""
    site = Site.open(context, content)
    received = site.apply(content)
    site.save(context)
    asked = content.config_records["evaluate"]
    reply = RecordDict({REPORT: MetricRecord(site.report(received))})
    if bool(asked["score"]):
        round_, data = int(number(asked, "round")), site.exp.data
        evaluator = Evaluator(training_device(site.exp.trainer))
        scores = evaluator.score_client(site.client, site.shard(round_), data.num_classes, bool(asked["confusion"]))
        scored: dict[str, ConfigRecordValues] = {"json": json.dumps(scores)}
        if (before := data.before_drift(round_)) is not None:
            earlier = evaluator.score_client(site.client, before[site.client.client_id], data.num_classes)
            scored["before_drift"] = json.dumps(earlier)
        reply["scores"] = ConfigRecord(scored)
    return reply


HANDLERS = {"train": train, "evaluate": evaluate}
