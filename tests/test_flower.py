"""The Flower adapter: the same federation over Flower's deployment processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_config

pytest.importorskip("flwr", reason="the flower extra is not installed (Flower needs Python 3.11+)")

from fedmoe_pl.aggregation import payload_bytes
from fedmoe_pl.algorithms import Instruction
from fedmoe_pl.flower.local import LocalDeployment
from fedmoe_pl.flower.wire import put_instructions, take_instructions

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, ::1


def _env() -> dict[str, str]:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _listening(pids: list[int]) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) of the TCP sockets these processes listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                found.append(fields[1].split(":")[0])
    return found


def _await(deployment: LocalDeployment, run: subprocess.Popen[bytes], timeout: float) -> list[str]:
    """Wait for the run; meanwhile collect every address a deployment process listens on."""
    addresses: set[str] = set()
    deadline = time.monotonic() + timeout
    while run.poll() is None and time.monotonic() < deadline:
        addresses.update(_listening(deployment.processes()))
        time.sleep(1)
    if run.poll() is None:
        run.kill()
        pytest.fail(f"the Flower run did not finish within {timeout:.0f} s")
    return sorted(addresses)


def test_flower_wire_carries_instructions_in_order_and_counts_their_bytes() -> None:
    from flwr.app import RecordDict

    first = {"w": torch.randn(3, 4), "steps": torch.tensor(7)}
    instructions = [Instruction(first), Instruction(None, {"svd_energy": 0.9}), Instruction({"b": torch.ones(5)})]
    content = RecordDict()
    put_instructions(content, instructions)
    received, sent = take_instructions(content)
    assert sent == payload_bytes(first) + payload_bytes({"b": torch.ones(5)})
    assert [i.settings for i in received] == [{}, {"svd_energy": 0.9}, {}]
    assert received[1].payload is None
    assert received[0].payload is not None and received[2].payload is not None
    assert all(torch.equal(received[0].payload[k], first[k]) for k in first)
    assert received[0].payload["steps"].dtype == torch.int64


@pytest.mark.slow
def test_flower_deployment_gives_the_fit_run_and_stops_every_process(tmp_path: Path) -> None:
    """Drifting data included: from round 2 each client holds the next one's data, and both runs score
    the clients on what they held before."""
    config = tiny_config(tmp_path, rounds=2)
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["drift"] = [{"round": 2, "kind": "rotate"}]
    config.write_text(yaml.safe_dump(cfg))
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmoe_pl.cli",
            "fit",
            "--config",
            str(config),
            "--federation.run_dir",
            str(tmp_path / "fit"),
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    with LocalDeployment(3, tmp_path / "flower-home", env=_env()) as deployment:
        run = deployment.run(["--config", str(config), "--federation.run_dir", str(tmp_path / "flower")], timeout=300)
        addresses = _await(deployment, run, timeout=600)
        assert run.returncode == 0
        started = deployment.processes()
    assert addresses and set(addresses) <= LOOPBACK, f"listening beyond the loopback: {addresses}"
    assert started, "the deployment's processes were not found"
    assert not deployment.processes(), "processes of the deployment outlived it"

    fit, flower = _metrics(tmp_path / "fit"), _metrics(tmp_path / "flower")
    assert [m["round"] for m in flower] == [1, 2]
    assert "mean_acc_before_drift" not in flower[0] and len(flower[1]["per_client"]["client_acc_before_drift"]) == 3
    for a, b in zip(fit, flower):
        assert b["per_client"]["client_acc"] == pytest.approx(a["per_client"]["client_acc"], abs=1e-6)
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6)
        assert b["mean_acc"] == pytest.approx(a["mean_acc"], abs=1e-6)
        assert b.get("mean_acc_before_drift") == pytest.approx(a.get("mean_acc_before_drift"), abs=1e-6)
        assert b["per_client"].get("client_acc_before_drift") == pytest.approx(
            a["per_client"].get("client_acc_before_drift"), abs=1e-6
        )
        assert b["failed"] == a["failed"] == [] and b["unreachable"] == []
        # What the method counts, and what crossed the wire: the arrays the clients and the server received.
        assert (b["bytes_up"], b["bytes_down"]) == (a["bytes_up"], a["bytes_down"])
        assert (b["wire_bytes_up"], b["wire_bytes_down"]) == (a["bytes_up"], a["bytes_down"])
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert (tmp_path / "flower" / "config.yaml").exists() and (tmp_path / "flower" / "partition.json").exists()


@pytest.mark.slow
def test_flower_client_killed_mid_round_leaves_the_others_to_finish_and_rejoins_with_its_state(
    tmp_path: Path,
) -> None:
    """Client 2's node dies while it trains round 2: the others finish the round without it. Started
    again at once (a new node id), it is found before the round's evaluation and goes on from the state
    its state-dir kept."""
    config = tiny_config(tmp_path, rounds=3)
    run_dir = tmp_path / "flower"
    with LocalDeployment(3, tmp_path / "flower-home", env=_env()) as deployment:
        run = deployment.run(["--config", str(config), "--federation.run_dir", str(run_dir)], timeout=300)
        log = tmp_path / "flower-home" / "supernode-2.log"

        def wait_for(done, what: str) -> None:
            deadline = time.monotonic() + 300
            while not done():
                assert run.poll() is None and time.monotonic() < deadline, what
                time.sleep(0.2)

        def rounds() -> int:
            return len(_metrics(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0

        wait_for(lambda: rounds() == 1, "round 1 never ended")
        wait_for(lambda: log.read_text().count("Receiving: train message") == 2, "client 2 never trained round 2")
        deployment.kill_node(2)
        deployment.restart_node(2)  # the SuperLink notices the loss later (a missed heartbeat)
        _await(deployment, run, timeout=600)
        assert run.returncode == 0
    assert not deployment.processes()

    records = _metrics(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3]
    assert [r["failed"] for r in records] == [[], [2], []]
    assert [r["unreachable"] for r in records] == [[], [], []], "found again for round 2's evaluation"
    assert [r["reported"] for r in records] == [3, 2, 3]
    assert [r["reset"] for r in records] == [[], [], []], "the restarted node should find its client's state"
    assert all(sorted(r["per_client"]["client_acc"]) == ["0", "1", "2"] for r in records)
    assert len(list((tmp_path / "flower-home" / "node-state").glob("run-*/client-2.pt"))) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["total_failed"] == 1


class _Grid:
    """A grid of in-process nodes: each answers with the instructions it received, unless it is silent."""

    def __init__(self, nodes: dict[int, int]) -> None:
        self.nodes = nodes  # node id -> partition id
        self.silent: set[int] = set()
        self.resets: set[int] = set()  # nodes that answer with a reset (they have no state for their client)
        self.received: dict[int, list[list]] = defaultdict(list)
        self.replies: dict[str, object] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: list) -> list[str]:
        from flwr.app import Message, MetricRecord, RecordDict

        ids = []
        for i, msg in enumerate(messages):
            mid = f"{msg.metadata.dst_node_id}-{len(self.replies)}-{i}"
            msg.metadata.__dict__["_message_id"] = mid  # the SuperLink names a pushed message
            node = msg.metadata.dst_node_id
            report = {"partition_id": self.nodes[node]}
            if "instructions" in msg.content.config_records:
                instructions, received = take_instructions(msg.content)
                self.received[node].append([(i.payload, i.settings) for i in instructions])
                report = {"bytes_received": received, "reset": int(node in self.resets)}
            if node not in self.silent:
                self.replies[mid] = Message(RecordDict({"report": MetricRecord(report)}), reply_to=msg)
            ids.append(mid)
        return ids

    def pull_messages(self, ids: list[str]) -> list:
        return [self.replies.pop(mid) for mid in ids if mid in self.replies]


def test_flower_link_keeps_the_instructions_of_a_silent_client_for_its_next_message() -> None:
    from flwr.app import RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmoe_pl.errors import ClientUnreachable
    from fedmoe_pl.flower.server import Link

    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a ServerApp process has
    try:
        grid = _Grid({11: 0, 12: 1})
        link = Link(grid, num_clients=2, timeout=0.5)  # type: ignore[arg-type]
        link.connect()
        assert link.node_of == {0: 11, 1: 12}
        a, b = {"w": torch.ones(2)}, {"w": torch.full((3,), 2.0)}
        link.pending[0].append(Instruction(a))
        link.pending[1].append(Instruction(a, {"energy": 0.5}))
        grid.silent.add(12)
        out = link.exchange("train", 1, {0: RecordDict(), 1: RecordDict()})
        assert not isinstance(out[0], Exception) and isinstance(out[1], ClientUnreachable)
        assert link.silent == {1} and [i.settings for i in link.pending[1]] == [{"energy": 0.5}]
        assert link.wire["wire_bytes_down"] == payload_bytes(a)  # what arrived: client 0's payload only
        link.timeout = 0.01  # the node stays silent: no need to wait for it
        for _ in range(50):  # a client away for 50 rounds: what waits for it stays one payload
            link.queue(1, Instruction(a))
            link.exchange("train", 2, {1: RecordDict()})
        assert len(link.pending[1]) == 1
        link.timeout = 0.5
        grid.silent.clear()
        link.queue(1, Instruction(b, {"energy": 0.7}))
        link.exchange("evaluate", 3, {1: RecordDict()})
        ((payload, settings),) = grid.received[12][-1]  # only what the client needs now: the latest payload
        assert torch.equal(payload["w"], b["w"]) and settings == {"energy": 0.7}
        assert not link.pending.get(1)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


def test_flower_local_refuses_bad_arguments_and_a_used_run_directory_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedmoe_pl.flower.local import main

    config = tiny_config(tmp_path)
    assert main(["--config", str(config), "--federation.roundz", "3"]) == 2
    assert "--federation.roundz" in capsys.readouterr().err
    used = tmp_path / "used"
    used.mkdir()
    (used / "metrics.jsonl").write_text('{"round": 1}\n')
    assert main(["--config", str(config), "--federation.run_dir", str(used)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (used / "metrics.jsonl").read_text() == '{"round": 1}\n' and not (tmp_path / "used.flower").exists()


@pytest.mark.slow
def test_flower_local_exits_nonzero_when_the_server_fails(tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    argv = ["--config", str(config), "--federation.run_dir", str(blocked / "run"), "--workdir", str(tmp_path / "fl")]
    done = subprocess.run(
        [sys.executable, "-m", "fedmoe_pl.flower.local", *argv], env=_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "the run did not complete" in done.stderr


def test_a_fit_the_server_gave_up_on_is_rolled_back_by_its_node(tmp_path: Path) -> None:
    """The node finished a fit after the server's timeout: the server counted it as failed, so the
    node's next message (which says the server accepted no fit) finds the client as before it."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmoe_pl.flower import client as node
    from fedmoe_pl.flower.wire import LINK, UPLOAD, from_record

    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        config = tiny_config(tmp_path)
        context = Context(1, 5, {"partition-id": 1}, RecordDict(), {"fit-args": f"--config {config}"})

        def message(kind: str, accepted: int, **records: ConfigRecord) -> Message:
            content = RecordDict({**records, LINK: ConfigRecord({"fits": accepted})})
            put_instructions(content, [])
            return Message(content, dst_node_id=5, message_type=kind, group_id="1")

        fit = ConfigRecord({"round": 1, "seed": 11, "epochs": 1})
        first = node.train(message("train", 0, fit=fit), context)  # the server timed out meanwhile
        trained = context.state.array_records[node.STATE].to_torch_state_dict()
        node.evaluate(message("evaluate", 0, evaluate=ConfigRecord({"score": False, "confusion": False})), context)
        rolled_back = context.state.array_records[node.STATE].to_torch_state_dict()
        assert any(not torch.equal(trained[k], rolled_back[k]) for k in trained)
        assert int(context.state.config_records[node.FITS]["fits"]) == 0
        again = node.train(message("train", 0, fit=fit), context)  # the same fit from the same state
        for key, value in from_record(first.content.array_records[UPLOAD]).items():
            assert torch.equal(from_record(again.content.array_records[UPLOAD])[key], value)
        with pytest.raises(RuntimeError, match="kept 1 fits but the server accepted 3"):
            node.train(message("train", 3, fit=fit), context)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


def test_a_restarted_node_finds_its_client_s_state_in_its_state_dir_or_reports_a_reset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``state-dir`` a node that starts again (an empty context) goes on from the state the last
    message left, late-fit rollback included; without it, it starts the client from its initial
    weights and says ``reset`` in its reply."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmoe_pl.flower import client as node
    from fedmoe_pl.flower.wire import LINK, REPORT, UPLOAD, from_record

    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        config = tiny_config(tmp_path)
        kept = tmp_path / "node state"

        def context(state_dir: Path | None) -> Context:
            node_config = {"partition-id": 1} | ({"state-dir": str(state_dir)} if state_dir else {})
            return Context(4, 5, node_config, RecordDict(), {"fit-args": f"--config {config}"})

        def message(kind: str, accepted: int) -> Message:
            content = RecordDict({LINK: ConfigRecord({"fits": accepted})})
            if kind == "train":
                content["fit"] = ConfigRecord({"round": accepted + 1, "seed": 11, "epochs": 1})
            else:
                content["evaluate"] = ConfigRecord({"score": False, "confusion": False})
            put_instructions(content, [])
            return Message(content, dst_node_id=5, message_type=kind, group_id="1")

        def state(ctx: Context) -> dict[str, torch.Tensor]:
            return ctx.state.array_records[node.STATE].to_torch_state_dict()

        def upload(reply: Message) -> dict[str, torch.Tensor]:
            return from_record(reply.content.array_records[UPLOAD])

        first_node = context(kept)
        first = node.train(message("train", 0), first_node)
        assert (kept / "run-4" / "client-1.pt").is_file()
        after_first = state(first_node)
        node.train(message("train", 1), first_node)  # a fit the server then gave up on

        restarted = context(kept)
        reply = node.evaluate(message("evaluate", 1), restarted)
        assert int(reply.content.metric_records[REPORT]["reset"]) == 0
        assert int(restarted.state.config_records[node.FITS]["fits"]) == 1
        assert all(torch.equal(value, after_first[k]) for k, value in state(restarted).items()), "rolled back"

        forgetful = context(None)
        reply = node.train(message("train", 1), forgetful)  # the server had accepted one fit
        assert int(reply.content.metric_records[REPORT]["reset"]) == 1
        assert int(forgetful.state.config_records[node.FITS]["fits"]) == 1
        for key, value in upload(first).items():  # the same fit from the initial weights as the first one
            assert torch.equal(upload(reply)[key], value), key

        blocked = tmp_path / "a-file"
        blocked.write_text("")
        unusable = context(blocked)
        with pytest.raises(RuntimeError, match="fix the node's state-dir"):
            node.train(message("train", 0), unusable)
        assert node.FITS not in unusable.state.config_records, "a failed message leaves the node's state as it was"

        def full_disk(*args: object, **kwargs: object) -> None:
            raise OSError(28, "No space left on device")

        with monkeypatch.context() as patched:
            patched.setattr(torch, "save", full_disk)
            full = context(tmp_path / "full")
            with pytest.raises(RuntimeError, match=r"could not keep the client's state .* No space left on device"):
                node.train(message("train", 0), full)
        assert node.FITS not in full.state.config_records and not list((tmp_path / "full").rglob("*.pt*"))
        (kept / "run-4" / "client-1.pt").write_bytes(b"not a state")
        with pytest.raises(RuntimeError, match="does not hold a client's state"):
            node.train(message("train", 1), context(kept))
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


def test_flower_link_finds_a_lost_client_on_a_node_that_joined_and_counts_a_reset_afresh() -> None:
    from flwr.app import RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmoe_pl.errors import ClientUnreachable
    from fedmoe_pl.flower.server import Link

    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        grid = _Grid({11: 0, 12: 1})
        link = Link(grid, num_clients=2, timeout=0.3)  # type: ignore[arg-type]
        link.connect()
        link.fits.update({0: 3, 1: 3})
        grid.silent.add(12)  # client 1's node left
        out = link.exchange("train", 4, {0: RecordDict(), 1: RecordDict()})
        assert isinstance(out[1], ClientUnreachable) and link.lost == {1}
        link.exchange("train", 5, {0: RecordDict()})  # nobody looks for client 1 until it is asked
        assert link.node_of[1] == 12

        grid.nodes[13] = 1  # it started again, with a new node id and no state
        grid.resets.add(13)
        out = link.exchange("evaluate", 6, {1: RecordDict()})
        assert not isinstance(out[1], Exception) and grid.received[13], "the message went to the new node"
        assert link.node_of == {0: 11, 1: 13} and not link.lost
        assert link.fits[1] == 0 and link.reset == {1} and link.fits[0] == 3
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before


@pytest.mark.slow
def test_a_resident_worker_serves_a_node_s_messages_as_the_node_s_own_process_would(tmp_path: Path) -> None:
    """One worker per (node, run, client) serves every message: the replies and the node's state
    equal those of serving each message in process; an error in the worker reaches the caller; the
    worker ends (and removes its socket and key) when its launcher ends or after ``idle`` seconds."""
    from flwr.app import ConfigRecord, Context, RecordDict

    from fedmoe_pl.flower import resident, site
    from fedmoe_pl.flower.client import STATE
    from fedmoe_pl.flower.wire import LINK, REPORT, UPLOAD, from_record

    config = tiny_config(tmp_path)
    launcher = subprocess.Popen(["sleep", "600"])
    run_id = int.from_bytes(os.urandom(6), "big")

    def context(partition: int = 1, run: int = run_id) -> Context:
        return Context(run, 5, {"partition-id": partition}, RecordDict(), {"fit-args": f"--config {config}"})

    def content(kind: str, accepted: int) -> RecordDict:
        body = RecordDict({LINK: ConfigRecord({"fits": accepted})})
        if kind == "train":
            body["fit"] = ConfigRecord({"round": accepted + 1, "seed": 11 + accepted, "epochs": 1})
        else:
            body["evaluate"] = ConfigRecord({"round": accepted, "score": True, "confusion": False})
        put_instructions(body, [])
        return body

    messages = [("train", 0), ("evaluate", 1), ("train", 1), ("evaluate", 2)]
    there, here = context(), context()
    sock = resident.socket_path(there, 1, launcher.pid)
    try:
        for kind, accepted in messages:
            remote = resident.call(kind, content(kind, accepted), there, 1, idle=600, launcher=launcher.pid)
            local = site.HANDLERS[kind](content(kind, accepted), here)
            assert dict(remote[REPORT]) == dict(local[REPORT])
            if kind == "train":
                for key, value in from_record(local.array_records[UPLOAD]).items():
                    assert torch.equal(from_record(remote.array_records[UPLOAD])[key], value), key
            else:
                assert remote.config_records["scores"]["json"] == local.config_records["scores"]["json"]
            a, b = there.state.array_records[STATE], here.state.array_records[STATE]
            assert all(torch.equal(x, b.to_torch_state_dict()[k]) for k, x in a.to_torch_state_dict().items())
        started = sock.with_suffix(".log").read_text().count("serving ")
        assert started == 1, "every message should reach the one worker started by the first"

        bad = context(partition=7, run=run_id + 1)  # outside 0 .. 2: raised in the worker, re-raised here
        with pytest.raises(ValueError, match="partition-id 7 is outside"):
            resident.call("train", content("train", 0), bad, 7, idle=1, launcher=launcher.pid)
        idle_sock = resident.socket_path(bad, 7, launcher.pid)
        deadline = time.monotonic() + 30
        while idle_sock.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not idle_sock.exists() and not idle_sock.with_suffix(".key").exists(), "an idle worker should end"
        assert sock.exists(), "the busy worker is not idle yet"
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 30
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not sock.exists() and not sock.with_suffix(".key").exists(), "the worker should end with its launcher"
    for leftover in [*sock.parent.glob(sock.stem + ".*"), *idle_sock.parent.glob(idle_sock.stem + ".*")]:
        leftover.unlink()


def test_a_node_without_a_usable_worker_folder_serves_its_message_in_process(tmp_path: Path, monkeypatch) -> None:
    import tempfile

    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmoe_pl.flower import client as node
    from fedmoe_pl.flower import resident, site

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(blocker))  # the workers' folder cannot be made under a file
    context = Context(7, 5, {"partition-id": 0}, RecordDict(), {"fit-args": "--config x.yaml"})
    with pytest.raises(resident.Unavailable):
        resident.call("train", RecordDict(), context, 0, idle=60, launcher=os.getpid())

    served = []
    monkeypatch.setitem(site.HANDLERS, "train", lambda content, ctx: served.append(ctx) or RecordDict())
    monkeypatch.setattr(resident, "wanted", lambda idle: True)  # as in a process Flower starts per message
    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    try:
        msg = Message(RecordDict({"fit": ConfigRecord({"seed": 1})}), dst_node_id=5, message_type="train", group_id="1")
        node.train(msg, context)
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = before
    assert served == [context]
