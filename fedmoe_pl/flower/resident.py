"""A node's resident worker: one long-lived process that serves the node's messages.

Flower's deployment engine starts a fresh ClientApp process for every message. Importing torch and
Lightning, reading the config, partitioning the data and building the client would then be paid
again for each ``train`` and ``evaluate``: seconds per message, most of a small round. Instead, the
first message a node receives starts this worker (``python -m fedmoe_pl.flower.resident``), which
does that work once and keeps it; every ClientApp process, light itself, hands its message to the
worker over a Unix socket and returns the reply.

The worker keeps no federation state: each request carries the node's context (its client's
state, kept by the SuperNode) and the reply carries it back, so a worker that ends, for any
reason, costs only the next message's start-up. It ends when the process that starts the node's
ClientApps (the node's SuperExec) is gone, or after ``idle`` seconds without a message.

One worker serves one (node, run, client): its socket, key and log live in a folder of this user's
only (``<tmp>/fedmoe-flower-<uid>``), named by a hash of the node's ClientApp launcher, the run
and the partition id. A request is authenticated with a random key only this user can read.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import secrets
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict

from fedmoe_pl.flower.local import _alive

PER_MESSAGE_PROCESS = "flwr.supernode.runtime.run_clientapp"  # loaded in a ClientApp process that serves one message
START_TIMEOUT = 300.0  # seconds a ClientApp waits for a worker it started to listen
WATCH_EVERY = 0.5  # seconds between the worker's checks of its launcher and of its idle time


class Unavailable(RuntimeError):
    """No worker can serve this node here (its folder, or starting it, failed): serve in process."""


def wanted(idle: float) -> bool:
    """Whether this process should hand its message to a resident worker: it serves one message and
    exits (Flower's deployment engine; the simulation engine keeps its processes), the platform has
    Unix sockets, and the run did not switch the worker off (``idle`` 0)."""
    return idle > 0 and PER_MESSAGE_PROCESS in sys.modules and os.name == "posix"


def folder() -> Path:
    """This user's folder of workers, private to them (refused if someone else could write in it)."""
    path = Path(tempfile.gettempdir()) / f"fedmoe-flower-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise PermissionError(
            f"{path} must be a folder of user {os.getuid()} that no one else can read or write; "
            "remove it or set TMPDIR to another folder"
        )
    return path


def socket_path(context: Context, partition: int, launcher: int) -> Path:
    """The socket of the worker that serves this node's client in this run."""
    key = f"{launcher}:{context.run_id}:{partition}"
    return folder() / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.sock"


def call(
    kind: str, content: RecordDict, context: Context, partition: int, idle: float, launcher: int | None = None
) -> RecordDict:
    """Serve one message through the node's worker (started if none is running); the node's
    context takes the state the worker returns. An error in the worker is raised here;
    :class:`Unavailable` if no worker could take the message (nothing was served then).

    ``launcher``: the process whose end ends the worker (default: this process's parent, the
    node's SuperExec, which starts a ClientApp process per message)."""
    launcher = os.getppid() if launcher is None else launcher
    try:
        sock = socket_path(context, partition, launcher)
        conn = _connect(sock)
        if conn is None:
            with _locked(sock.with_suffix(".lock")):
                conn = _connect(sock) or _start(sock, idle, launcher)
    except (OSError, RuntimeError) as err:  # before the message reached a worker: nothing was served
        raise Unavailable(str(err)) from err
    with conn:
        conn.send((kind, content, context))
        try:
            ok, value = conn.recv()
        except EOFError:
            raise RuntimeError(
                f"the node's resident worker ended while serving a {kind} message; its log is "
                f"{sock.with_suffix('.log')}"
            ) from None
    if not ok:
        raise value
    reply, state = value
    context.state = state
    return reply


def _connect(sock: Path) -> Connection | None:
    try:
        key = sock.with_suffix(".key").read_bytes()
        return Client(str(sock), family="AF_UNIX", authkey=key)
    except (OSError, EOFError, AuthenticationError):  # no worker, one ending, or a stale key
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _start(sock: Path, idle: float, launcher: int) -> Connection:
    """Start a worker for ``sock`` (the caller holds its lock) and connect to it once it listens."""
    for stale in (sock, sock.with_suffix(".key")):
        stale.unlink(missing_ok=True)
    key = sock.with_suffix(".key")
    descriptor = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(secrets.token_bytes(32))
    log = sock.with_suffix(".log")
    argv = [sys.executable, "-m", "fedmoe_pl.flower.resident", str(sock), "--idle", str(idle)]
    argv += ["--watch", str(launcher)]
    with open(log, "ab") as out:
        worker = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"the node's resident worker exited with {worker.returncode}; its log is {log}")
        conn = _connect(sock) if sock.exists() else None
        if conn is not None:
            return conn
        time.sleep(0.1)
    worker.kill()
    raise RuntimeError(f"the node's resident worker did not listen within {START_TIMEOUT:.0f} s; its log is {log}")


def _picklable(error: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def serve(sock: Path, idle: float, watch: int) -> None:
    """Listen on ``sock`` and serve requests one at a time until the launcher ``watch`` is gone or
    nothing came for ``idle`` seconds."""
    from fedmoe_pl.flower.site import HANDLERS  # torch and Lightning, once, before listening

    listener = Listener(str(sock), family="AF_UNIX", authkey=sock.with_suffix(".key").read_bytes())
    print(f"serving {sock} (pid {os.getpid()}) until pid {watch} ends or {idle:g} s pass idle", flush=True)
    inode = sock.stat().st_ino
    busy = threading.Lock()
    last = [time.monotonic()]

    def watchdog() -> None:
        while True:
            time.sleep(WATCH_EVERY)
            with busy:
                if _alive(watch) and time.monotonic() - last[0] <= idle:
                    continue
                # Under the spawners' lock: no ClientApp starts a successor until these files are gone.
                with _locked(sock.with_suffix(".lock")):
                    with contextlib.suppress(FileNotFoundError):
                        if sock.stat().st_ino == inode:
                            sock.with_suffix(".key").unlink(missing_ok=True)
                            sock.unlink()
                    os._exit(0)

    threading.Thread(target=watchdog, daemon=True).start()
    while True:
        try:
            conn = listener.accept()
        except Exception:  # a caller that failed authentication or hung up before it
            continue
        with busy, conn:
            try:
                kind, content, context = conn.recv()
            except (EOFError, OSError):
                continue
            try:
                reply: tuple[bool, Any] = (True, (HANDLERS[kind](content, context), context.state))
            except BaseException as error:  # the ClientApp raises it; Flower replies with the error
                reply = (False, _picklable(error))
            with contextlib.suppress(OSError):
                conn.send(reply)
            last[0] = time.monotonic()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A Flower node's resident worker (started by its ClientApp).")
    parser.add_argument("socket", type=Path)
    parser.add_argument("--idle", type=float, required=True, help="seconds without a message before it ends")
    parser.add_argument("--watch", type=int, required=True, help="the pid whose end ends the worker")
    args = parser.parse_args(argv)
    serve(args.socket, args.idle, args.watch)


if __name__ == "__main__":
    main()
