"""The ServerApp: the federation's round loop, with its clients on Flower SuperNodes.

The loop is :class:`~fedmoe_pl.run.federation.Federation` itself, with the same sampling, the same
:class:`~fedmoe_pl.algorithms.Algorithm` (``configure``, ``aggregate``), the same sinks and the
same run directory as ``fedmoe-pl fit`` (no checkpoint: the clients' states live on their nodes,
so a Flower run is not resumed). What changes is the fleet, where the clients are
(:class:`FlowerFleet`):

- an instruction for a client (a payload to download, round settings) waits until the next
  message to that client, and every one is sent before the round ends;
- a local fit is a ``train`` message to the client's node, with the round's seed and epochs;
- evaluation is an ``evaluate`` message: each node scores its client and the server combines the
  scores as the in-process evaluator does (:func:`fedmoe_pl.analysis.evaluation.summarize`).

A node that does not answer within ``timeout`` seconds, or that Flower reports gone, is left out of
the round (``failed`` in the round's record) and of its evaluation (``unreachable``); the others go
on, whatever ``federation.on_client_error`` says, and the loop's rule for rounds in which nobody
reported applies (``federation.max_empty_rounds``). What waits for an absent client collapses to
what it needs now (one payload: a download replaces what a client shares, so only the latest
matters; the round settings merged), so the queue stays bounded however long it is away. Every
message tells the node how many of its client's fits the server has accepted; a node that finished
a fit the server had already given up on (slower than ``timeout``) rolls its client back to the
state before that fit, so server and node always agree on the client's state.

A client whose node left is looked for again before its next message: a SuperNode that joined since
(a restarted node gets a new node id) and holds the same ``partition-id`` takes its place. If that
node found the client's state (the node config's ``state-dir``), the client goes on where it was; if
not, the node starts the client afresh from its initial weights and the round's record lists it
under ``reset``.

Each record also carries ``wire_bytes_up`` and ``wire_bytes_down``: the bytes of the arrays the
server received and the clients received, which equal the simulation's ``bytes_up``/``bytes_down``.

The run config (``[tool.flwr.app.config]``, or ``flwr run ... --run-config``) holds ``fit-args``,
the arguments of ``fedmoe-pl fit``, and ``timeout``.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedmoe_pl.aggregation import payload_bytes
from fedmoe_pl.algorithms import ClientResult, FederatedClient, Instruction
from fedmoe_pl.analysis.evaluation import summarize, with_forgetting
from fedmoe_pl.errors import ClientUnreachable
from fedmoe_pl.fleets.executor import quiet_lightning
from fedmoe_pl.fleets.fleet import Cohort, FitOutcome
from fedmoe_pl.fleets.in_process import InProcessFleet
from fedmoe_pl.flower.wire import LINK, REPORT, UPLOAD, from_record, number, put_instructions
from fedmoe_pl.run.experiment import Experiment, fit
from fedmoe_pl.run.federation import Federation
from fedmoe_pl.run.sinks import Sink

log = logging.getLogger(__name__)

GONE = {
    ErrorCode.NODE_UNAVAILABLE,
    ErrorCode.MESSAGE_UNAVAILABLE,
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE,
    ErrorCode.CLIENT_APP_CRASHED,
}

POLL_S = 0.5  # seconds between two looks for replies

app = ServerApp()


class Link:
    """The server's line to the clients: which node holds which client, and what waits for each.

    Args:
        grid: Flower's grid of the run.
        num_clients: clients of the federation; one node each must connect.
        timeout: seconds to wait for the replies of one exchange (and for the nodes at the start).
    """

    def __init__(self, grid: Grid, num_clients: int, timeout: float) -> None:
        self.grid, self.num_clients, self.timeout = grid, num_clients, timeout
        self.node_of: dict[int, int] = {}
        self.pending: dict[int, list[Instruction]] = defaultdict(list)  # at most one each (collapse)
        self.fits: dict[int, int] = defaultdict(int)  # fits of each client whose result the server accepted
        self.wire = {"wire_bytes_up": 0, "wire_bytes_down": 0}  # of the round in progress
        self.silent: set[int] = set()  # clients that did not answer in the round in progress
        self.lost: set[int] = set()  # clients whose node was gone at their last message: looked for again
        self.reset: set[int] = set()  # clients whose node started them afresh in the round in progress

    def connect(self) -> None:
        """Wait for one node per client and learn which client each holds."""
        deadline = time.monotonic() + self.timeout
        while len(nodes := list(self.grid.get_node_ids())) < self.num_clients:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{len(nodes)} SuperNodes connected within {self.timeout:.0f} s, but the federation has "
                    f"{self.num_clients} clients; start one SuperNode per client (--node-config 'partition-id=K')"
                )
            time.sleep(0.5)
        holders, errors = self._holders(nodes)
        doubled = {cid: found for cid, found in holders.items() if len(found) > 1}
        missing = sorted(set(range(self.num_clients)) - set(holders))
        if doubled or missing:
            raise RuntimeError(
                f"each client needs exactly one SuperNode (--node-config 'partition-id=K'): none for clients "
                f"{missing}, several for {doubled}" + "".join(f"\n  {error}" for error in errors)
            )
        self.node_of = {cid: found[0] for cid, found in holders.items()}

    def _holders(self, nodes: list[int]) -> tuple[dict[int, list[int]], list[str]]:
        """Ask each node which client it holds: the nodes of each client, and the nodes' errors."""
        holders: dict[int, list[int]] = defaultdict(list)
        errors = []
        for node, reply in zip(nodes, self._send("query", 0, {node: RecordDict() for node in nodes})):
            if isinstance(reply, Message):
                holders[int(number(reply.content.metric_records[REPORT], "partition_id"))].append(node)
            else:
                errors.append(str(reply))
        return holders, errors

    def rediscover(self) -> None:
        """Look for the lost clients among the nodes that joined since: one that holds a lost client's
        partition (only one) becomes its node."""
        known = set(self.node_of.values())
        joined = [node for node in self.grid.get_node_ids() if node not in known]
        if not joined:
            return
        holders, _ = self._holders(joined)
        for cid, found in sorted(holders.items()):
            if cid not in self.lost:
                continue
            if len(found) > 1:
                log.warning("client %d is held by several new nodes %s; start one SuperNode per client", cid, found)
                continue
            log.warning("client %d is now on node %d (its node %d left)", cid, found[0], self.node_of[cid])
            self.node_of[cid] = found[0]
            self.lost.discard(cid)

    def exchange(self, kind: str, round_: int, contents: dict[int, RecordDict]) -> dict[int, Message | Exception]:
        """Send each client its content (with its pending instructions); the reply or error of each.

        A client that does not answer keeps its instructions pending, for its next message: one that
        was only slow then catches up, in order, before it trains again.
        """
        if self.lost & set(contents):
            self.rediscover()
        sent = {cid: self.pending.pop(cid, []) for cid in contents}
        for cid, content in contents.items():
            put_instructions(content, sent[cid])
            content[LINK] = ConfigRecord({"fits": self.fits[cid]})
        replies = self._send(kind, round_, {self.node_of[cid]: content for cid, content in contents.items()})
        out: dict[int, Message | Exception] = {}
        for cid, reply in zip(contents, replies):
            out[cid] = reply
            if isinstance(reply, Message):
                self.lost.discard(cid)
                report = reply.content.metric_records[REPORT]
                self.wire["wire_bytes_down"] += int(number(report, "bytes_received"))
                if report.get("reset"):  # the node started the client afresh: it has kept no fit
                    log.warning("client %d was started afresh by its node (the node had no state for it)", cid)
                    self.fits[cid] = 0
                    self.reset.add(cid)
            else:
                if waiting := collapse([*sent[cid], *self.pending.get(cid, [])]):
                    self.pending[cid] = waiting
                self.silent.add(cid)
                if isinstance(reply, ClientUnreachable):
                    self.lost.add(cid)
        return out

    def queue(self, cid: int, instruction: Instruction) -> None:
        """Keep an instruction for the client's next message (collapsed with what already waits)."""
        self.pending[cid] = collapse([*self.pending.get(cid, []), instruction])

    def _send(self, kind: str, round_: int, contents: dict[int, RecordDict]) -> list[Message | Exception]:
        """Push one message per node and pull the replies, each matched to its message (an error the
        SuperLink writes for a node that left comes from the SuperLink, not from the node)."""
        messages = [
            Message(content, dst_node_id=node, message_type=kind, group_id=str(round_), ttl=self.timeout)
            for node, content in contents.items()
        ]
        sent = dict(zip(self.grid.push_messages(messages), contents))  # message id -> node
        replies: dict[int, Message] = {}
        deadline = time.monotonic() + self.timeout
        while len(replies) < len(sent) and time.monotonic() < deadline:
            waiting = [mid for mid, node in sent.items() if node not in replies]
            for pulled in self.grid.pull_messages(waiting):
                replies[sent[pulled.metadata.reply_to_message_id]] = pulled
            if len(replies) < len(sent):
                time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        out: list[Message | Exception] = []
        for node in contents:
            reply = replies.get(node)
            if reply is None:
                out.append(ClientUnreachable(f"node {node} sent no reply within {self.timeout:.0f} s"))
            elif reply.has_error():
                error = reply.error
                cause = ClientUnreachable if error.code in GONE else RuntimeError
                out.append(cause(f"node {node}: {error.reason} (Flower error code {error.code})"))
            else:
                out.append(reply)
        return out


class FlowerFleet:
    """The clients on Flower SuperNodes, one each (see the module docstring).

    The server also builds every client once, from the config, to read: the method's initial global
    state (:meth:`Algorithm.start`), the FLOPs count and the parameter counts of the summary.

    Args:
        link: the server's line to the nodes (connected).
        exp: the experiment, as every node reads it too.
    """

    resumable = False  # the clients' states live on their nodes

    def __init__(self, link: Link, exp: Experiment) -> None:
        self.link, self.data = link, exp.data
        self.local = InProcessFleet(exp.data, exp.client, exp.algorithm, exp.seed)
        self.num_clients, self.model_names = self.local.num_clients, self.local.model_names
        self.fingerprint = self.local.fingerprint

    def clients(self) -> Sequence[FederatedClient]:
        return self.local.clients()

    def flops_per_sample(self, client_id: int) -> float:
        return self.local.flops_per_sample(client_id)

    def describe(self, client_id: int) -> dict[str, Any]:
        return self.local.describe(client_id)

    def deliver(self, instructions: dict[int, Instruction]) -> int:
        """Queue each instruction for the client's next message; the bytes the simulation counts."""
        for cid, instruction in instructions.items():
            self.link.queue(cid, instruction)
        return sum(payload_bytes(i.payload) for i in instructions.values() if i.payload is not None)

    def fit(self, cohort: Cohort) -> Iterator[FitOutcome]:
        """One ``train`` message to each client's node, all at once."""
        contents = {
            cid: RecordDict({"fit": ConfigRecord({"round": cohort.round, "seed": seed, "epochs": cohort.epochs})})
            for cid, seed in cohort.seeds.items()
        }
        for cid, reply in self.link.exchange("train", cohort.round, contents).items():
            if isinstance(reply, Exception):
                yield FitOutcome(cid, error=reply)
                continue
            self.link.fits[cid] += 1
            upload = from_record(reply.content.array_records[UPLOAD])
            report = reply.content.metric_records[REPORT]
            self.link.wire["wire_bytes_up"] += payload_bytes(upload)
            samples, metrics = int(number(report, "num_samples")), {"train_loss": number(report, "train_loss")}
            yield FitOutcome(cid, result=ClientResult(cid, upload, samples, metrics))

    def evaluate(self, round_: int, ids: Sequence[int], confusion: bool) -> dict[str, Any]:
        asked = set(ids)
        waiting = {cid for cid, queued in self.link.pending.items() if queued}
        targets = sorted(asked | (waiting - self.link.silent))
        contents = {cid: _evaluate_message(round_, cid in asked, confusion) for cid in targets}
        scores: dict[int, dict[str, Any] | None] = {}
        earlier: dict[int, dict[str, Any] | None] = {}  # on the data held before the latest drift
        unreachable = []
        for cid, reply in self.link.exchange("evaluate", round_, contents).items():
            if isinstance(reply, Exception):
                log.warning("client %d was not evaluated: %s", cid, reply)
                unreachable.append(cid)
            elif cid in asked:
                scored = reply.content.config_records["scores"]
                scores[cid] = json.loads(str(scored["json"]))
                if "before_drift" in scored:
                    earlier[cid] = json.loads(str(scored["before_drift"]))
        out = summarize(scores, self.data.num_classes, confusion)
        if earlier:
            out = with_forgetting(out, summarize(earlier, self.data.num_classes))
        return {**out, "unreachable": unreachable}

    def end_round(self, round_: int) -> dict[str, Any]:
        # Instructions of a round without evaluation still reach their clients now (not those of a
        # client that did not answer this round: they wait for its next message).
        waiting = sorted(cid for cid, queued in self.link.pending.items() if queued and cid not in self.link.silent)
        if waiting:
            apply_only = {cid: _evaluate_message(round_, score=False, confusion=False) for cid in waiting}
            for cid, reply in self.link.exchange("evaluate", round_, apply_only).items():
                if isinstance(reply, Exception):
                    log.warning("client %d did not receive the round's instructions: %s", cid, reply)
        measured: dict[str, Any] = {**self.link.wire, "reset": sorted(self.link.reset)}
        self.link.wire = dict.fromkeys(self.link.wire, 0)  # the next round counts afresh
        self.link.silent.clear()
        self.link.reset.clear()
        return measured

    def state_dict(self) -> Any:
        raise RuntimeError("a Flower run keeps its clients on their nodes; it has no checkpoint to write")

    def load_state_dict(self, state: Any) -> None:
        raise RuntimeError("a Flower run cannot be resumed from a checkpoint; start it again")

    def checkpoint_saved(self) -> None:
        pass


def collapse(instructions: list[Instruction]) -> list[Instruction]:
    """Instructions in order as one: the latest payload (each download replaces what the client
    shares) and the settings merged, later ones winning. Empty for none."""
    if len(instructions) <= 1:
        return list(instructions)
    payload = next((i.payload for i in reversed(instructions) if i.payload is not None), None)
    settings: dict[str, Any] = {}
    for instruction in instructions:
        settings.update(instruction.settings)
    return [Instruction(payload, settings)]


def _evaluate_message(round_: int, score: bool, confusion: bool) -> RecordDict:
    """An ``evaluate`` message's own content: the round (whose data a drifting run scores), whether to
    score the client and its confusion matrix."""
    return RecordDict({"evaluate": ConfigRecord({"round": round_, "score": score, "confusion": confusion})})


def run(exp: Experiment, grid: Grid, timeout: float) -> dict[str, Any]:
    """``fedmoe-pl fit`` with the clients on the grid's nodes: the same run directory, metrics and W&B."""

    def build(exp: Experiment, sinks: Sequence[Sink], device: Any, group: Any) -> Federation:
        link = Link(grid, exp.data.num_clients, timeout)
        link.connect()
        return Federation(exp.federation, exp.algorithm, FlowerFleet(link, exp), exp.seed, sinks)

    return fit(exp, build=build)


@app.main()
def main(grid: Grid, context: Context) -> None:
    from fedmoe_pl.cli import experiment_from_args

    quiet_lightning()
    exp = experiment_from_args(shlex.split(str(context.run_config["fit-args"])))
    summary = run(exp, grid, float(context.run_config.get("timeout", 600.0)))
    log.warning(
        "fedmoe-pl on Flower: final mean client test accuracy %s; results: %s",
        summary["final_mean_acc"],
        exp.federation.run_dir,
    )
