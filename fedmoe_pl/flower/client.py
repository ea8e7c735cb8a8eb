"""The ClientApp: one SuperNode holds one federated client, the one its ``partition-id`` names.

The first message a node serves reads the run's configuration (the run config's ``fit-args``, the
arguments of ``fedmoe-pl fit``): the node loads the data and partitions it as a simulation does,
keeps its own shard, and builds its own client only (its initial weights are a pure function of the
run's seed and its id); later messages reuse them. Every message loads the client's state from the
node's context (its initial weights before the first fit), so a node's client trains on the same
batches from the same weights as in ``fedmoe-pl fit``.

Flower's deployment engine starts a process per message; this module is light (no torch), and
hands ``train`` and ``evaluate`` to the node's resident worker (:mod:`fedmoe_pl.flower.resident`),
which keeps the imports, the data and the built client between messages. The run config's
``worker-idle`` (seconds; 0 serves every message in its own process, as Flower does) says how long
a worker waits for the next message. Under the simulation engine, whose processes live on, messages
are served in process. The handling itself is :mod:`fedmoe_pl.flower.site`.

Messages (``message_type``):
    query: which client this node holds.
    train: apply the pending instructions, train one local fit (the sequential executor, with the
        round's seed), reply with the upload, the sample count and the training loss.
    evaluate: apply the pending instructions and, if asked, score the client on its test shard.

Each message also says how many of this client's fits the server accepted. A fit that ended after
the server stopped waiting for it (the node was slower than ``timeout``) was counted as failed
there: the node then has one fit more, and rolls its client back to the state before that fit.
"""

from __future__ import annotations

import logging

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmoe_pl.flower import resident
from fedmoe_pl.flower.wire import REPORT, number

STATE = "fedmoe.client"  # the client's state in the node's context, between messages
BEFORE_FIT = "fedmoe.client.before_fit"  # its state before its last fit: to roll back a fit the server gave up on
FITS = "fedmoe.fits"  # how many fits the client has kept
WORKER_IDLE = 600.0  # seconds a node's resident worker waits for a message, unless the run config says

app = ClientApp()
log = logging.getLogger(__name__)


def partition_id(context: Context) -> int:
    value = context.node_config.get("partition-id")
    if value is None:
        raise ValueError(
            "this SuperNode has no partition-id; start it with --node-config 'partition-id=K' "
            "(K: the client it holds, 0 .. num_clients - 1)"
        )
    return int(value)


def worker_idle(context: Context) -> float:
    if "worker-idle" not in context.run_config:
        return WORKER_IDLE
    idle = number(context.run_config, "worker-idle")
    if idle < 0:
        raise ValueError(f"worker-idle is {idle}; give seconds >= 0 (0 serves each message in its own process)")
    return float(idle)


def serve(kind: str, msg: Message, context: Context) -> Message:
    """The reply to a ``train`` or ``evaluate`` message, from the node's worker or from this process."""
    cid, idle = partition_id(context), worker_idle(context)
    if resident.wanted(idle):
        try:
            return Message(resident.call(kind, msg.content, context, cid, idle), reply_to=msg)
        except resident.Unavailable as err:
            log.warning("the node's resident worker is unavailable (%s); serving the message in this process", err)
    from fedmoe_pl.flower.site import HANDLERS

    return Message(HANDLERS[kind](msg.content, context), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    return Message(RecordDict({REPORT: MetricRecord({"partition_id": partition_id(context)})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return serve("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return serve("evaluate", msg, context)
