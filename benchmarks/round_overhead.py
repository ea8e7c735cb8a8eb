"""One pFedMoE round through each executor against a minimal plain-PyTorch loop doing the same work.

All sides start every client from the same weights, train the round's sampled clients with the
same SGD steps on the same batches (same shuffling and augmentation seeds), average the global
experts, and evaluate every client on its test set. The federation also writes its checkpoint, as
every real round does. The ratios are what Lightning and the federation's bookkeeping cost on top
of the bare training (sequential executor), or what training the clients together saves (batched).

    python benchmarks/round_overhead.py [--config configs/quickstart.yaml] [--repeats 2]
        [--executors sequential batched] [--device cpu|cuda] [-- FIT ARGUMENTS...]

    # 100 clients, C = 0.1 (10 clients a round, about 600 images each)
    python benchmarks/round_overhead.py -- --data.num_clients 100 --federation.participation 0.1

On a GPU, the mean utilisation (``nvidia-smi``, sampled every 50 ms) is printed beside each time.
"""

from __future__ import annotations

import argparse
import copy
import gc
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from fedmoe_pl.aggregation import weighted_mean
from fedmoe_pl.cli import _experiment, build_parser, subcommand_parser
from fedmoe_pl.fleets.batched import BatchedExecutor
from fedmoe_pl.fleets.executor import Executor, SequentialExecutor, quiet_lightning
from fedmoe_pl.run.experiment import build_federation
from fedmoe_pl.run.federation import Federation
from fedmoe_pl.run.rundir import RunDirectory
from fedmoe_pl.run.schedule import fit_seed
from fedmoe_pl.run.sinks import Checkpoint


class RoundCheckpoint(Checkpoint):
    """The checkpoint a real round writes after training (not the one before round 1)."""

    def on_run_start(self, fed: Federation) -> None:
        pass


class Utilisation:
    """Mean GPU utilisation (%) while the block runs, from nvidia-smi; None on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.enabled = device.type == "cuda"
        self.samples: list[float] = []
        self._stop = threading.Event()

    def _poll(self) -> None:
        query = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"]
        while not self._stop.wait(0.05):
            try:
                self.samples.append(float(subprocess.run(query, capture_output=True, text=True).stdout.split()[0]))
            except (OSError, ValueError, IndexError):
                return

    def __enter__(self) -> Utilisation:
        if self.enabled:
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def plain_round(clients, data, seed: int, sampled: list[int], device: torch.device) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    uploads, weights = [], []
    for k in sampled:
        client, shard = clients[k].to(device), data.clients[k]
        shard.shuffle_seed = fit_seed(seed, 1, k)
        cfg = client.config
        optimizer = torch.optim.SGD(
            client.param_groups(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        client.train()
        for x, y in shard.train_batches(device):
            loss = F.cross_entropy(client.moe(x)[0], y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        uploads.append({n: t.detach().clone() for n, t in client.moe.global_expert.state_dict().items()})
        weights.append(shard.num_train)
    merged = weighted_mean(uploads, weights)
    accs = []
    for k in sampled:  # as the federation does: the new global expert goes to the clients that reported
        clients[k].moe.global_expert.load_state_dict(merged)
    for k, client in enumerate(clients):
        client.to(device).eval()
        correct = torch.zeros((), device=device, dtype=torch.long)
        with torch.inference_mode():
            for x, y in data.clients[k].eval_batches(device):
                correct += (client.moe(x)[0].argmax(1) == y).sum()
        accs.append(int(correct) / data.clients[k].num_test)
    return time.perf_counter() - start, sum(accs) / len(accs)


def measure(
    config: str, fit_args: list[str], executors: list[str], device: torch.device, repeats: int = 2
) -> dict[str, Any]:
    """Time one round of the plain loop and of each executor (best of ``repeats``, after a warm-up pass).

    Returns the setting (clients, clients a round, SGD steps) and per side: seconds, rounds/s,
    client-epochs/s, mean GPU utilisation, peak GPU memory (bytes) and the round's mean accuracy.
    """
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    cli = build_parser()
    times: dict[str, list[float]] = {"plain": [], **{name: [] for name in executors}}
    utilisation: dict[str, list[float | None]] = {name: [] for name in times}
    peak: dict[str, int] = dict.fromkeys(times, 0)
    accuracy: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["fit", "--config", config, "--federation.rounds", "1", "--federation.run_dir", tmp]
        cfg = cli.parse_args([*argv, "--trainer.accelerator", accelerator, *fit_args])
        exp = _experiment(subcommand_parser(cli, "fit"), cfg.fit)
        torch.manual_seed(exp.seed)
        exp.data.setup(exp.seed)
        run_dir = RunDirectory(tmp)
        run_dir.acquire()
        fed = build_federation(exp, [RoundCheckpoint(run_dir, {})], device)
        server = fed.algorithm
        for client in fed.fleet.pool:  # every client starts from the server's initial global expert
            client.download(server.global_payload)
        server.held = [server.version] * len(fed.fleet.pool)
        initial = [copy.deepcopy(c.state_dict()) for c in fed.fleet.pool]
        initial_server = copy.deepcopy(server.state_dict())
        sampled = fed.schedule[0]
        makers: dict[str, Callable[[], Executor]] = {
            "sequential": lambda: SequentialExecutor(exp.trainer),
            "batched": lambda: BatchedExecutor(device, SequentialExecutor(exp.trainer), exp.trainer),
            "batched_per_architecture": lambda: BatchedExecutor(
                device, SequentialExecutor(exp.trainer), exp.trainer, across_architectures=False
            ),
        }
        steps = sum(len(exp.data.clients[k].train_dataloader()) for k in sampled)
        for repeat in range(repeats + 1):  # the first pass warms up caches and lazy imports
            plain_clients = [copy.deepcopy(c) for c in fed.fleet.pool]
            for c, s in zip(plain_clients, initial):
                c.load_state_dict(s)
            gc.collect()
            _reset_peak(device)
            with Utilisation(device) as busy:
                seconds, accuracy["plain"] = plain_round(plain_clients, exp.data, exp.seed, sampled, device)
            del plain_clients
            if repeat:
                times["plain"].append(seconds)
                utilisation["plain"].append(busy.mean)
                peak["plain"] = max(peak["plain"], _peak(device))
            order = executors[repeat % len(executors) :] + executors[: repeat % len(executors)]
            for name in order:  # each executor goes first in turn
                # visit: the reset is not a change a round made, so the round writes only its own clients
                for c, s in zip(fed.fleet.pool.visit(range(len(initial))), initial):
                    c.load_state_dict(s)
                server.load_state_dict(copy.deepcopy(initial_server))
                fed.round, fed.final, fed.best = 0, None, None
                fed.fleet.executor = makers[name]()
                gc.collect()
                _reset_peak(device)
                with Utilisation(device) as busy:
                    start = time.perf_counter()
                    accuracy[name] = fed.run()["final_mean_acc"]
                    seconds = time.perf_counter() - start
                if repeat:
                    times[name].append(seconds)
                    utilisation[name].append(busy.mean)
                    peak[name] = max(peak[name], _peak(device))
        run_dir.release()
    epochs = len(sampled) * exp.federation.local_epochs
    sides = {}
    for name, values in times.items():
        best = min(values)
        used = [u for u in utilisation[name] if u is not None]
        sides[name] = {
            "seconds": best,
            "rounds_per_s": 1 / best,
            "client_epochs_per_s": epochs / best,
            "gpu_util_percent": sum(used) / len(used) if used else None,
            "peak_gpu_bytes": peak[name] if device.type == "cuda" else None,
            "time_over_plain": best / min(times["plain"]),
            "mean_acc": accuracy[name],
        }
    return {"clients": len(fed.fleet.pool), "per_round": len(sampled), "steps": steps, "sides": sides}


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--executors", nargs="+", default=["sequential", "batched"], choices=["sequential", "batched"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("fit_args", nargs="*", help="more fit arguments, after --")
    args = parser.parse_args()
    quiet_lightning()
    device = torch.device(args.device)
    result = measure(args.config, args.fit_args, args.executors, device, args.repeats)
    print(
        f"config={args.config} {' '.join(args.fit_args)}: {result['clients']} clients, {result['per_round']} a round, "
        f"{result['steps']} SGD steps per round, device "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}"
        f" ({torch.get_num_threads()} threads), best of {args.repeats}"
    )
    for name, side in result["sides"].items():
        busy = f", GPU busy {side['gpu_util_percent']:5.1f} %" if side["gpu_util_percent"] is not None else ""
        print(
            f"{name:10s} round {side['seconds']:7.3f} s  ({side['rounds_per_s']:6.2f} rounds/s){busy}  "
            f"time / plain {side['time_over_plain']:6.3f}  mean accuracy {side['mean_acc']:.4f}"
        )
    sides = result["sides"]
    if "sequential" in sides and "batched" in sides:
        print(f"batched rounds/s over sequential: {sides['sequential']['seconds'] / sides['batched']['seconds']:.3f}")


if __name__ == "__main__":
    main()
