"""A Flower deployment on this machine: a SuperLink and one SuperNode per client, as separate processes.

    python -m fedmoe_pl.flower.local --config configs/quickstart.yaml --federation.rounds 3

starts them (listening on 127.0.0.1 only, on free ports), submits the run with ``flwr run`` (the
arguments are those of ``fedmoe-pl fit``; the number of SuperNodes is the config's
``data.num_clients``), streams its log, and stops every process it started, with their children,
however the run ends. Spread over hosts, the same processes are started by hand (README).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from fedmoe_pl.run.rundir import RunDirectory

APP_DIR = Path(__file__).resolve().parent / "app"  # the Flower app (its pyproject.toml), installed with the package
HOST = "127.0.0.1"
NODE_ID_LINE = "SuperNode ID:"  # what a SuperNode logs once the SuperLink has registered it
MARK = "FEDMOE_FLOWER_DEPLOYMENT"  # in the environment of every process of one deployment, children included


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, process: subprocess.Popen[bytes], log: Path, timeout: float = 120.0, host: str = HOST
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{log.stem} exited with {process.returncode}; its log is {log}")
        with socket.socket() as s:
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listened on {host}:{port} within {timeout:.0f} s; see {log}")


def wait_for_registration(process: subprocess.Popen[bytes], log: Path, seen: int = 0, timeout: float = 120.0) -> None:
    """Wait until the SuperNode logging to ``log`` has its node id from the SuperLink (its log then holds
    more than ``seen`` registrations)."""
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count(NODE_ID_LINE) <= seen:
        if process.poll() is not None:
            raise RuntimeError(f"{log.stem} exited with {process.returncode}; its log is {log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{log.stem} did not register with the SuperLink within {timeout:.0f} s; see {log}")
        time.sleep(0.2)


class LocalDeployment:
    """A SuperLink and ``num_clients`` SuperNodes (``partition-id`` 0 .. N-1) on 127.0.0.1.

    Use it as a context manager: leaving it stops every process it started and their children.

    Args:
        num_clients: SuperNodes to start, one per client of the federation.
        workdir: Flower's home (``FLWR_HOME``, with the SuperLink connection), the processes' logs and
            the nodes' ``state-dir`` (``node-state``: a restarted node finds its client's state there).
        env: the processes' environment (default: this process's).
        host: the address the SuperLink listens on (default 127.0.0.1).
        node_prefix: a command the SuperNodes are started under (e.g. ``ip netns exec NAME``, to put
            them in another network namespace; they then listen on that namespace's 127.0.0.1).
    """

    def __init__(
        self,
        num_clients: int,
        workdir: Path,
        env: dict[str, str] | None = None,
        host: str = HOST,
        node_prefix: Sequence[str] = (),
    ) -> None:
        self.num_clients, self.workdir = num_clients, Path(workdir)
        self.host, self.node_prefix = host, list(node_prefix)
        self.mark = uuid.uuid4().hex
        bin_dir = str(Path(sys.executable).parent)  # Flower starts its helpers (flower-superexec, ...) from PATH
        base = dict(os.environ if env is None else env)
        self.env = {**base, "FLWR_HOME": str(self.workdir / "flwr-home"), MARK: self.mark}
        self.env["PATH"] = os.pathsep.join([bin_dir, base.get("PATH", "")])
        self.port = 0
        self.superlink: subprocess.Popen[bytes] | None = None
        self.supernodes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def _spawn(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as out:
            return subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self) -> None:
        home = self.workdir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        address = f"{self.host}:{self.port}"
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "{address}"\ninsecure = true\n'
        )
        self.superlink = self._spawn(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",  # the apps run in this environment, as installed
        )
        wait_for_port(self.port, self.superlink, self.workdir / "superlink.log", host=self.host)
        for cid in range(self.num_clients):
            self.supernodes.append(self._supernode(cid))
        for cid, node in enumerate(self.supernodes):
            wait_for_registration(node, self.workdir / f"supernode-{cid}.log")

    def _supernode(self, cid: int) -> subprocess.Popen[bytes]:
        """Start client ``cid``'s SuperNode (its log: ``supernode-<cid>.log``, appended to by a restart)."""
        port = free_port()  # its HTTP API, for the ClientApps it starts
        state_dir = _toml_escape(str(self.workdir / "node-state"))
        return self._spawn(
            f"supernode-{cid}",
            *self.node_prefix,
            "flower-supernode",
            "--insecure",
            "--superlink",
            f"{self.host}:{self.port}",
            "--host",
            HOST,
            "--port",
            str(port),
            "--node-config",
            f'partition-id={cid} num-partitions={self.num_clients} state-dir="{state_dir}"',
        )

    def run(
        self, fit_args: list[str], timeout: float = 600.0, app_dir: Path = APP_DIR, worker_idle: float | None = None
    ) -> subprocess.Popen[bytes]:
        """Submit a run (``fedmoe-pl fit`` arguments) and stream its log; returns the ``flwr run`` process.
        ``worker_idle``: the run config's ``worker-idle`` (default: the app's)."""
        config = f'fit-args="{_toml_escape(shlex.join(fit_args))}" timeout={float(timeout)}'
        if worker_idle is not None:
            config += f" worker-idle={float(worker_idle)}"
        argv = ["flwr", "run", str(app_dir), "local", "--stream", "--run-config", config]
        return subprocess.Popen(argv, env=self.env, start_new_session=True)

    def kill_node(self, cid: int) -> None:
        """SIGKILL client ``cid``'s SuperNode and its ClientApp process: a site that vanishes."""
        node = self.supernodes[cid]
        for pid in _with_descendants([node.pid]):
            _signal(pid, signal.SIGKILL)
        node.wait()

    def restart_node(self, cid: int, timeout: float = 120.0) -> None:
        """Start client ``cid``'s SuperNode again (after :meth:`kill_node`): a site that comes back.
        Returns once the SuperLink has given it its (new) node id."""
        log = self.workdir / f"supernode-{cid}.log"
        registered = log.read_text(errors="replace").count(NODE_ID_LINE)
        self.supernodes[cid] = self._supernode(cid)
        wait_for_registration(self.supernodes[cid], log, seen=registered, timeout=timeout)

    def processes(self) -> list[int]:
        """The pids of every live process of this deployment, children included: on Linux, by the mark in
        their environment (which also finds the helpers Flower detaches); elsewhere, by the process tree."""
        if Path("/proc/self/environ").exists():
            return _marked(self.mark)
        return [pid for pid in _with_descendants([p.pid for p in self._started()]) if _alive(pid)]

    def _started(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in [self.superlink, *self.supernodes] if p is not None]

    def stop(self, grace: float = 10.0) -> None:
        """Stop every process of the deployment: SIGTERM, then SIGKILL what is left after ``grace`` seconds."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            pids = self.processes()
            for pid in pids:
                _signal(pid, sig)
            deadline = time.monotonic() + wait
            while self.processes() and time.monotonic() < deadline:
                for p in self._started():
                    p.poll()  # reap what this process started
                time.sleep(0.2)
        for p in self._started():
            p.poll()


def _toml_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # someone else's process: alive
            return True
        return True
    return state != "Z"  # a zombie has exited; its parent has not read its status yet


def _marked(mark: str) -> list[int]:
    """Live processes whose environment carries this deployment's mark (Linux)."""
    found = []
    needle = f"{MARK}={mark}".encode()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0") and _alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _with_descendants(pids: list[int]) -> list[int]:
    """These processes and all their descendants, from one look at the process table."""
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, check=False).stdout
    children: dict[int, list[int]] = {}
    for line in table.splitlines():
        child, parent = (int(x) for x in line.split())
        children.setdefault(parent, []).append(child)
    out, todo = list(pids), list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run a federation as a Flower deployment on this machine (SuperLink + one SuperNode per client)",
        epilog="Every other argument is one of fedmoe-pl fit's (--config ..., --federation.rounds ...).",
    )
    parser.add_argument("--workdir", default=None, help="Flower's home and the logs (default: <run_dir>.flower)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one round's replies")
    parser.add_argument(
        "--worker-idle",
        type=float,
        default=None,
        help="seconds a node's resident worker waits for its next message (0: a process per message; default 600)",
    )
    args, fit_args = parser.parse_known_args(argv)
    if args.worker_idle is not None and args.worker_idle < 0:
        print(f"error: --worker-idle {args.worker_idle} is negative; give seconds >= 0", file=sys.stderr)
        return 2
    from fedmoe_pl.cli import experiment_from_args
    from fedmoe_pl.flower import require_flower

    require_flower()
    try:
        exp = experiment_from_args(list(fit_args))
    except (argparse.ArgumentError, ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    run_dir = Path(exp.federation.run_dir)
    if RunDirectory(run_dir).holds_run():  # refused before any process starts
        print(
            f"error: run directory {str(run_dir)!r} already holds a run; choose another --federation.run_dir "
            "(a Flower run is not resumed: its clients' states live on their nodes)",
            file=sys.stderr,
        )
        return 2
    workdir = Path(args.workdir or run_dir.with_name(run_dir.name + ".flower"))
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: cannot create {str(workdir)!r} for Flower's files ({err}); pass --workdir", file=sys.stderr)
        return 2
    print(f"Flower processes' logs and home: {workdir}", file=sys.stderr)
    with LocalDeployment(exp.data.num_clients, workdir) as deployment:
        submitted = deployment.run(list(fit_args), args.timeout, worker_idle=args.worker_idle)
        try:
            code = submitted.wait()
        finally:
            if submitted.poll() is None:
                submitted.terminate()
                submitted.wait()
    # `flwr run` exits 0 whatever became of the run: the run directory's summary says.
    status = RunDirectory(run_dir).status
    if code == 0 and status != "completed":
        print(f"error: the run did not complete (status {status}); see the log above and {workdir}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    raise SystemExit(main())
