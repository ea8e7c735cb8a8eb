"""Cost over a link, measured: a Flower deployment whose client reaches the server over a link shaped to
a given rate, against the same run over the unshaped link and against the report's link model.

The SuperLink (with the ServerApp) runs here; the SuperNode (with its ClientApps) runs in a network
namespace this script creates, joined to this one by a virtual Ethernet pair (MTU 1500). So what
crosses the pair is exactly what crosses a real link between a server and a client site; the
processes on each side talk to each other over their own loopback, which is not shaped. For the
shaped run each end of the pair sends through a token bucket (``tc qdisc ... tbf``) at ``--mbps``.
The federation has one client (pFedMoE, CNN-1, synthetic 28x28 images), as the link model
(:class:`fedmoe_pl.analysis.results.Link`, what ``fedmoe-pl report --link-mbps`` uses) gives each
client a link of its own. What the shaped round takes beyond the unshaped one is set against the
model's seconds per round, computed from the run's own byte counts (the arrays only, as ``bytes_up``
and ``bytes_down`` count them; the wire also carries Flower's framing, TCP/IP headers and polls).

    python benchmarks/flower_link.py [--mbps 1] [--rounds 4]

It needs root (to create the namespace and shape its traffic) and the ``ip`` and ``tc`` tools; where
either is missing it says why and exits 0 without measuring.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from flower_round import config  # this folder's sibling: the same synthetic pFedMoE run

SERVER, NODE = "10.213.77.1", "10.213.77.2"  # the two ends of the pair (a /30 of its own)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True)


@contextlib.contextmanager
def site(mbps: float | None) -> Iterator[str]:
    """A network namespace for the client site, joined to this one by a veth pair whose two ends send
    at ``mbps`` (None: unshaped); yields the namespace's name."""
    tag = f"{os.getpid() % 100000}"
    name, here, there = f"fedmoe-site-{tag}", f"fmsrv{tag}", f"fmnode{tag}"
    _run("ip", "netns", "add", name)
    try:
        _run("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        _run("ip", "link", "set", there, "netns", name)
        _run("ip", "addr", "add", f"{SERVER}/30", "dev", here)
        _run("ip", "link", "set", here, "mtu", "1500", "up")
        _run("ip", "-n", name, "addr", "add", f"{NODE}/30", "dev", there)
        _run("ip", "-n", name, "link", "set", there, "mtu", "1500", "up")
        _run("ip", "-n", name, "link", "set", "lo", "up")
        if mbps is not None:  # a 16 kB bucket and a queue of 2 s of traffic at the rate, on each end
            tbf = ["root", "tbf", "rate", f"{mbps}mbit", "burst", "16kb", "latency", "2s"]
            _run("tc", "qdisc", "add", "dev", here, *tbf)
            _run("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", there, *tbf)
        yield name
    finally:
        subprocess.run(["ip", "link", "del", here], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def why_not() -> str | None:
    """Why a link cannot be shaped here (None: it can)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "shaping a link needs root (a network namespace, a veth pair and tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"the {tool!r} tool is not installed (iproute2)"
    try:
        with site(10.0):
            pass
    except subprocess.CalledProcessError as err:
        return f"this machine cannot make a shaped link: {' '.join(err.cmd)}: {err.stderr.strip()}"
    return None


def measure(namespace: str, path: Path, folder: Path, timeout: float = 1200.0) -> tuple[list[dict], dict]:
    """One Flower run with its SuperNode in ``namespace``: its rounds' records and its summary."""
    from fedmoe_pl.flower.local import LocalDeployment

    run_dir = folder / "run"
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    node = ["ip", "netns", "exec", namespace]
    with LocalDeployment(1, folder / "flower", env, host=SERVER, node_prefix=node) as deployment:
        run = deployment.run(["--config", str(path), "--federation.run_dir", str(run_dir)], timeout=timeout)
        deadline = time.monotonic() + timeout
        while run.poll() is None and time.monotonic() < deadline:
            time.sleep(1)
        if run.poll() is None:
            run.kill()
            run.wait()
    summary = run_dir / "summary.json"
    if not summary.is_file() or json.loads(summary.read_text())["status"] != "completed":
        raise SystemExit(f"the Flower run did not complete; see the logs in {folder / 'flower'}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records, json.loads(summary.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mbps", type=float, nargs="+", default=[1.0, 10.0], help="shaped link rates, Mbit/s")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if not all(rate > 0 for rate in args.mbps) or args.rounds < 2:
        parser.error(f"--mbps {args.mbps} must be positive and --rounds {args.rounds} at least 2")
    if reason := why_not():
        print(f"skipped: {reason}")
        return
    from fedmoe_pl.analysis.results import Link

    later: dict[float | None, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = config(Path(tmp), args.rounds, zoo=("cnn1",))
        for mbps in [None, *args.mbps]:
            folder = Path(tmp) / ("unshaped" if mbps is None else f"{mbps:g}mbps")
            folder.mkdir()
            with site(mbps) as name:
                records, summary = measure(name, path, folder)
            later[mbps] = sum(r["wall_s"] for r in records[1:]) / len(records[1:])
            print(f"{folder.name}: seconds per round {[round(r['wall_s'], 2) for r in records]}", file=sys.stderr)
    # The arrays that crossed the link in rounds 2.. (the same in every run), per round.
    wire = sum(r["wire_bytes_up"] + r["wire_bytes_down"] for r in records[1:]) / len(records[1:])
    per_fit = (summary["total_bytes_up"] + summary["total_bytes_down"]) / summary["total_reported"]
    print(f"\n1 client, pFedMoE (CNN-1), {args.rounds} rounds; mean seconds per round over rounds 2-{args.rounds}")
    print(
        f"arrays up and down: {wire / 1e6:.2f} MB per round in rounds 2-{args.rounds}, {per_fit / 1e6:.2f} MB per fit "
        f"over the run (the report's average); unshaped link: {later[None]:.2f} s per round"
    )
    print("| link | shaped | shaped - unshaped (measured) | these rounds' arrays at the rate | measured / that |")
    print("|---|---:|---:|---:|---:|")
    for mbps in args.mbps:
        computed = 8 * wire / (mbps * 1e6)
        measured = later[mbps] - later[None]
        print(f"| {mbps:g} Mbit/s | {later[mbps]:.2f} | {measured:.2f} | {computed:.2f} | {measured / computed:.3f} |")
    print(
        "the report's link model (the run's average per fit): "
        + ", ".join(f"{Link(mbps, mbps).seconds_per_round(summary):.2f} s at {mbps:g} Mbit/s" for mbps in args.mbps)
    )


if __name__ == "__main__":
    main()
