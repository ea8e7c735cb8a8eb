"""One round of the quickstart federation against a minimal plain-PyTorch loop doing the same work.

Both sides start every client from the same weights, run the same SGD steps on the same batches
(same shuffling and augmentation seeds), average the global experts, and evaluate every client on
its test set. The federation side also writes its checkpoint, as every real round does. The ratio
is what Lightning and the federation's bookkeeping cost on top of the bare training.

    python benchmarks/round_overhead.py [--config configs/quickstart.yaml] [--repeats 2]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
import torch.nn.functional as F

from fedmoe_pl.aggregation import weighted_mean
from fedmoe_pl.cli import _experiment, build_parser, subcommand_parser
from fedmoe_pl.experiment import build_federation
from fedmoe_pl.federation import Federation, quiet_lightning
from fedmoe_pl.rundir import RunDirectory
from fedmoe_pl.schedule import fit_seed
from fedmoe_pl.sinks import Checkpoint


class RoundCheckpoint(Checkpoint):
    """The checkpoint a real round writes after training (not the one before round 1)."""

    def on_run_start(self, fed: Federation) -> None:
        pass


def plain_round(clients, data, seed: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    uploads, weights = [], []
    for k, client in enumerate(clients):
        shard = data.clients[k]
        shard.shuffle_seed = fit_seed(seed, 1, k)
        cfg = client.config
        optimizer = torch.optim.SGD(
            client.param_groups(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        client.train()
        for x, y in shard.train_batches():
            loss = F.cross_entropy(client.moe(x)[0], y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        uploads.append({n: t.detach().clone() for n, t in client.moe.global_expert.state_dict().items()})
        weights.append(shard.num_train)
    merged = weighted_mean(uploads, weights)
    accs = []
    for k, client in enumerate(clients):
        client.moe.global_expert.load_state_dict(merged)
        client.eval()
        correct = 0
        with torch.inference_mode():
            for x, y in data.clients[k].eval_batches():
                correct += int((client.moe(x)[0].argmax(1) == y).sum())
        accs.append(correct / data.clients[k].num_test)
    return time.perf_counter() - start, sum(accs) / len(accs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    quiet_lightning()
    torch.set_num_threads(torch.get_num_threads())
    cli = build_parser()
    fed_times, plain_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        sub = subcommand_parser(cli, "fit")
        cfg = cli.parse_args(
            [
                "fit",
                "--config",
                args.config,
                "--federation.rounds",
                "1",
                "--federation.run_dir",
                tmp,
                "--trainer.accelerator",
                "cpu",
            ]
        )
        exp = _experiment(sub, cfg.fit)
        torch.manual_seed(exp.seed)
        exp.data.setup(exp.seed)
        run_dir = RunDirectory(tmp)
        run_dir.acquire()
        fed = build_federation(exp, [RoundCheckpoint(run_dir, {})])
        server = fed.algorithm
        for client in fed.clients:  # every client starts from the server's initial global expert
            client.download(server.global_payload)
        server.held = [server.version] * len(fed.clients)
        initial = [copy.deepcopy(c.state_dict()) for c in fed.clients]
        initial_server = copy.deepcopy(server.state_dict())
        steps = sum(len(d.train_dataloader()) for d in exp.data.clients)
        for repeat in range(args.repeats + 1):  # the first pair warms up caches and lazy imports
            plain_clients = [copy.deepcopy(c) for c in fed.clients]
            for c, s in zip(plain_clients, initial):
                c.load_state_dict(s)
            plain, plain_acc = plain_round(plain_clients, exp.data, exp.seed)
            for c, s in zip(fed.clients, initial):
                c.load_state_dict(s)
            server.load_state_dict(copy.deepcopy(initial_server))
            fed.round, fed.final, fed.best = 0, None, None
            start = time.perf_counter()
            fed_acc = fed.run()["final_mean_acc"]
            federation = time.perf_counter() - start
            if repeat:
                plain_times.append(plain)
                fed_times.append(federation)
    f, p = min(fed_times), min(plain_times)
    print(f"config={args.config}: {len(fed.clients)} clients, {steps} SGD steps per round, best of {args.repeats}")
    print(f"federation round : {f:7.2f} s")
    print(f"plain PyTorch    : {p:7.2f} s")
    print(f"ratio            : {f / p:7.3f}  (target <= 1.10)")
    # Same method, same data, two independent implementations: the accuracies should agree.
    print(f"mean accuracy after the round: federation {fed_acc:.4f}, plain loop {plain_acc:.4f}")


if __name__ == "__main__":
    main()
