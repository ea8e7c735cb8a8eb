"""pFedMoE's numbers, pinned: a refactoring of the loop, the protocol or the clients must not move them.

The values were recorded on CPU (torch 2.14) from the tiny seeded runs below, once clients'
initial weights became a pure function of the run's seed and the client id (the refactor that put
the clients behind a fleet left the numbers of the time unchanged, checked by the same tests). If a
deliberate change to the method moves them, record them again and say so in CHANGELOG.md.
"""

import json

import pytest
from helpers import tiny_config

from fedmoe_pl.cli import main

PINNED = [  # (train loss, client accuracies, mean gate weight on the global expert) per round
    (1.4638721148173015, [0.5, 0.5, 1.0], [0.4236910939216614, 0.4159611165523529, 0.41406577825546265]),
    (0.7056690375010172, [1.0, 1.0, 1.0], [0.33464688062667847, 0.3413830101490021, 0.45297837257385254]),
    (0.4834441026051839, [1.0, 1.0, 1.0], [0.491234689950943, 0.26056963205337524, 0.4921765923500061]),
]


def test_pfedmoe_first_rounds_are_unchanged(tmp_path) -> None:
    main(["fit", "--config", str(tiny_config(tmp_path, rounds=3))])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3]
    for row, (loss, accs, gates) in zip(rows, PINNED):
        assert row["train_loss"] == pytest.approx(loss, rel=1e-5)
        assert [row["per_client"]["client_acc"][str(k)] for k in range(3)] == accs
        assert [row["per_client"]["client_gate_global"][str(k)] for k in range(3)] == pytest.approx(gates, rel=1e-5)


def client_fingerprints(run) -> dict[int, list[float]]:
    """Every client's final tensors, as (sum, sum of absolute values) over all of them, from the run's
    last checkpoint and the client files it names."""
    import torch

    state = torch.load(run / "last.ckpt", map_location="cpu", weights_only=False)
    out = {}
    for cid, version in sorted(state["clients"]["version"].items()):
        tensors = torch.load(run / "clients" / f"{cid}.r{version}.pt", map_location="cpu")
        values = [t.double() for t in tensors.values() if t.is_floating_point()]
        out[int(cid)] = [float(sum(v.sum() for v in values)), float(sum(v.abs().sum() for v in values))]
    return out


@pytest.mark.parametrize("method", ["pfedmoe", "fedproto", "lg_fedavg"])
def test_per_round_metrics_and_client_tensors_are_unchanged(tmp_path, method: str) -> None:
    """A run's per-round metrics and every client's final tensors; sampling half the clients a round
    and the disk store (clients built on demand), so that where clients live cannot move a number."""
    from helpers import overlay

    algorithm = {
        "pfedmoe": {"class_path": "fedmoe_pl.algorithms.PFedMoE", "init_args": {"gate_hidden": 16}},
        "fedproto": {"class_path": "fedmoe_pl.algorithms.FedProto"},
        "lg_fedavg": {"class_path": "fedmoe_pl.algorithms.LGFedAvg"},
    }[method]
    values = {"algorithm": algorithm, "data": {"num_clients": 4}}
    config = tiny_config(tmp_path, rounds=3, participation=0.5, client_store="disk")
    main(["fit", "--config", str(config), "--config", str(overlay(tmp_path, method, values))])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    got = {
        "loss": [r["train_loss"] for r in rows],
        "acc": [r["mean_acc"] for r in rows],
        "clients": client_fingerprints(tmp_path / "run"),
    }
    want = PINNED_RUNS[method]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
    assert got["acc"] == pytest.approx(want["acc"], abs=1e-9)
    assert sorted(got["clients"]) == sorted(int(k) for k in want["clients"])
    for cid, sums in want["clients"].items():
        assert got["clients"][int(cid)] == pytest.approx(sums, rel=1e-6), f"client {cid}"


PINNED_RUNS = {  # per-round train loss and mean accuracy; (sum, sum of |x|) of each trained client's tensors
    "pfedmoe": {
        "loss": [1.5003869533538818, 1.1370542287826537, 1.1276974280675254],
        "acc": [0.375, 0.5, 0.625],
        "clients": {0: [605.649444155847, 15572.500295831353], 2: [563.2299230419285, 19344.609021028493],
                    3: [612.841269430031, 15565.89205592792]},
    },
    "fedproto": {
        "loss": [1.3740363756815592, 2.117495807011922, 0.9236588080724081],
        "acc": [0.2875, 0.4125, 0.375],
        "clients": {0: [197.90345857488725, 7620.72238647342], 2: [-230.7611278616406, 11516.742829017205],
                    3: [205.8788142313679, 7614.145372636079]},
    },
    "lg_fedavg": {
        "loss": [1.406992212931315, 1.8199057737986246, 1.1599705219268799],
        "acc": [0.34375, 0.3875, 0.375],
        "clients": {0: [63.69143757153108, 7508.268845170063], 2: [-270.49390914080175, 11270.885900250792],
                    3: [69.45703806278763, 7500.693037048594]},
    },
}  # fmt: skip
