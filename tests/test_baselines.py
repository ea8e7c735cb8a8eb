from pathlib import Path

import pytest
import torch
import yaml

from fedmoe_pl.aggregation import payload_bytes
from fedmoe_pl.algorithms import (
    FD,
    FML,
    Algorithm,
    ClassStats,
    ClientConfig,
    ClientContext,
    ClientResult,
    FedAPEN,
    FedAvg,
    FedGH,
    FedKD,
    FedProto,
    LGFedAvg,
    Standalone,
    svd_compress,
    svd_restore,
)
from fedmoe_pl.cli import build_parser, subcommand_parser
from fedmoe_pl.data import IID, FederatedDataModule, Synthetic
from fedmoe_pl.fleets.in_process import InProcessFleet
from fedmoe_pl.run.federation import Federation, FederationConfig
from fedmoe_pl.run.sinks import Sink

HETERO = ["cnn5", "cnn4", "cnn3"]
ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = sorted((ROOT / "configs" / "methods").glob("*.yaml"))  # every shipped method
EXTRA = {"fedkd": ["--algorithm.init_args.svd_energy", "0.95"]}  # exercise optional paths too


def from_overlay(overlay: Path) -> tuple[Algorithm, list]:
    """The overlay's algorithm and its zoo (the overlay's own, else a heterogeneous one)."""
    parser = subcommand_parser(build_parser(), "fit")
    init = parser.instantiate(parser.parse_args(["--config", str(overlay), *EXTRA.get(overlay.stem, [])]))
    zoo = (yaml.safe_load(overlay.read_text()).get("client") or {}).get("zoo", HETERO)
    return init.algorithm, zoo


def client(alg: Algorithm, model: str = "cnn5", cid: int = 0, classes: int = 4):
    return alg.build_client(ClientContext(cid, model, 1, 16, classes, ClientConfig(zoo=[model])))


def federation(alg: Algorithm, zoo=HETERO, rounds=2) -> Federation:
    data = FederatedDataModule(Synthetic(num_classes=3, train_per_class=90), IID(), 3, batch_size=16)
    data.setup(0)
    cfg = FederationConfig(rounds=rounds, local_epochs=2)
    return Federation(cfg, alg, InProcessFleet(data, ClientConfig(zoo=zoo, lr=0.02), alg, 0), seed=0)


class Records(Sink):
    def __init__(self) -> None:
        self.records: list[dict] = []

    def on_round_end(self, fed, record) -> None:
        self.records.append(record)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.stem)
def test_two_round_federation_runs_and_counts_what_is_sent(overlay) -> None:
    name = overlay.stem
    alg, zoo = from_overlay(overlay)
    fed = federation(alg, zoo)
    sizes = []
    original_upload = [c.upload for c in fed.fleet.pool]
    for c, up in zip(fed.fleet.pool, original_upload):
        c.upload = lambda up=up: (sizes.append(payload_bytes(p := up())), p)[1]  # type: ignore[method-assign]
    sink = Records()
    fed.sinks.append(sink)
    fed.run()
    records = sink.records
    assert [r["round"] for r in records] == [1, 2]
    assert fed.totals["bytes_up"] == sum(sizes) and len(sizes) == 6  # 3 clients x 2 rounds
    if name == "standalone":
        assert fed.totals["bytes_up"] == fed.totals["bytes_down"] == 0
    else:
        assert fed.totals["bytes_up"] > 0 and fed.totals["bytes_down"] > 0
    assert records[-1]["mean_acc"] > 0.6  # 3 shared classes: chance is 1/3


def test_fedavg_refuses_a_heterogeneous_zoo() -> None:
    with pytest.raises(ValueError, match=r"client.zoo is \['cnn1', 'cnn2'\].*\[cnn1\]"):
        FedAvg().check(ClientConfig(zoo=["cnn1", "cnn2"]))
    FedAvg().check(ClientConfig(zoo=["cnn1", "cnn1"]))


def test_standalone_sends_nothing() -> None:
    assert client(Standalone()).upload() == {}


def test_fedavg_shares_the_whole_model() -> None:
    a, b = client(FedAvg()), client(FedAvg())
    assert a.upload().keys() == a.model.state_dict().keys()
    b.download(a.upload())
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_lg_fedavg_shares_only_the_head() -> None:
    a, b = client(LGFedAvg(), "cnn1"), client(LGFedAvg(), "cnn3")
    assert set(a.upload()) == {"weight", "bias"}
    before = {k: v.clone() for k, v in b.model.extractor.state_dict().items()}
    b.download(a.upload())
    assert torch.equal(b.model.head.weight, a.model.head.weight)
    assert all(torch.equal(before[k], v) for k, v in b.model.extractor.state_dict().items())


def test_class_stats_are_per_class_means_by_hand() -> None:
    stats = ClassStats(3)
    stats.add(torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]]), torch.tensor([0, 0, 2]))
    payload = stats.payload()
    torch.testing.assert_close(payload["means"], torch.tensor([[2.0, 1.0], [0.0, 0.0], [5.0, 5.0]]))
    assert payload["counts"].tolist() == [2, 0, 1]


def test_fedgh_server_trains_the_global_head_on_uploaded_representations() -> None:
    alg = FedGH(server_lr=0.5, server_epochs=20)
    c = client(alg, classes=2)
    alg.start([c], seed=0, rounds=1)
    reps = torch.zeros(2, 500)
    reps[0, :10], reps[1, 10:20] = 1.0, 1.0  # two separable class representations
    uploads = [
        {"means": reps[:1].clone().repeat(2, 1) * torch.tensor([[1.0], [0.0]]), "counts": torch.tensor([5, 0])},
        {"means": reps.clone(), "counts": torch.tensor([3, 4])},
    ]
    sent = alg.aggregate(1, [ClientResult(0, uploads[0], 5), ClientResult(0, uploads[1], 7)])
    head = sent[0].payload
    assert head is not None and head.keys() == {"weight", "bias"}
    logits = reps @ head["weight"].T + head["bias"]
    assert logits.argmax(1).tolist() == [0, 1]
    c.download(head)
    assert torch.equal(c.model.head.weight, head["weight"])


def test_fedgh_server_order_comes_from_the_runs_seed_and_the_round() -> None:
    def head_after(seed: int, round_: int) -> torch.Tensor:
        torch.manual_seed(0)  # the same initial head every time
        alg = FedGH(server_lr=0.5)
        alg.start([client(alg, classes=3)], seed=seed, rounds=5)
        reps = torch.eye(3, 500)
        upload = {"means": reps, "counts": torch.tensor([1, 1, 1])}
        return alg.combine(round_, [ClientResult(0, upload, 3)])["weight"]

    assert torch.equal(head_after(0, 2), head_after(0, 2))  # a resumed run repeats it
    assert not torch.equal(head_after(0, 2), head_after(1, 2))
    assert not torch.equal(head_after(0, 2), head_after(0, 3))


def test_fd_distils_toward_the_global_distribution_of_each_class() -> None:
    c = client(FD(distill_weight=2.0), classes=3)
    logits, y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), torch.tensor([0, 1])
    assert c.regulariser(torch.zeros(2, 500), logits, y).item() == 0.0  # nothing known yet
    global_logits = torch.tensor([[3.0, 0.0, 0.0], [9.0, 9.0, 9.0], [0.0, 0.0, 0.0]])
    c.download({"means": global_logits, "counts": torch.tensor([4, 0, 1])})
    # Only sample 0's class is known: 2 * KL(softmax(3,0,0) || softmax(1,0,0)) over half the batch.
    p, q = global_logits[0].softmax(0), logits[0].softmax(0)
    expected = 2.0 * (p * (p.log() - q.log())).sum() * 0.5
    torch.testing.assert_close(c.regulariser(torch.zeros(2, 500), logits, y), expected)


def test_fd_mse_variant_distils_toward_the_global_logits() -> None:
    c = client(FD(distill_weight=2.0, distill_loss="mse"), classes=3)
    logits, y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), torch.tensor([0, 1])
    assert c.regulariser(torch.zeros(2, 500), logits, y).item() == 0.0  # nothing known yet
    global_logits = torch.tensor([[3.0, 0.0, 0.0], [9.0, 9.0, 9.0], [0.0, 0.0, 0.0]])
    c.download({"means": global_logits, "counts": torch.tensor([4, 0, 1])})
    # Only sample 0's class is known; sample 1 counts as zero in the batch mean (the published rule):
    # 2 * ((1-3)^2 + 0 + 0 + 0 + 0 + 0) / 6 = 4/3.
    torch.testing.assert_close(c.regulariser(torch.zeros(2, 500), logits, y), torch.tensor(4 / 3))


def test_fedproto_counts_a_sample_of_a_class_without_prototype_as_zero_in_the_batch_mean() -> None:
    """FedProto's published code: proto_new = protos.clone(); known rows <- global prototypes;
    loss = mse(proto_new, protos) over the whole batch."""
    c = client(FedProto(proto_weight=0.5), classes=3)
    features = torch.randn(4, c.model.feature_dim, requires_grad=True)
    protos = torch.randn(3, c.model.feature_dim)
    c.download({"means": protos, "counts": torch.tensor([2, 0, 5])})  # class 1: nobody else holds it
    y = torch.tensor([0, 1, 1, 2])
    reference = features.detach().clone()
    for i, label in enumerate(y.tolist()):
        if label != 1:
            reference[i] = protos[label]
    expected = 0.5 * ((features - reference) ** 2).mean()
    got = c.regulariser(features, torch.zeros(4, 3), y)
    torch.testing.assert_close(got, expected)
    (grad,) = torch.autograd.grad(got, features)
    assert torch.equal(grad[1], torch.zeros_like(grad[1])) and grad[0].abs().sum() > 0


def test_fedproto_regularises_toward_prototypes_and_can_classify_by_them() -> None:
    c = client(FedProto(proto_weight=1.0, inference="prototype"), classes=3)
    x = torch.randn(2, 1, 16, 16)
    c.eval()
    features = c.model.forward_features(x).detach()
    protos = torch.stack([features[1], features[0], features[0] + 100])
    c.download({"means": protos, "counts": torch.tensor([1, 1, 0])})  # class 2 unknown
    assert c(x).argmax(1).tolist() == [1, 0]
    reg = c.regulariser(features, torch.zeros(2, 3), torch.tensor([1, 0]))
    assert reg.item() == pytest.approx(0.0, abs=1e-10)


def test_mutual_learning_methods_share_only_the_small_model() -> None:
    for alg in (FML(), FedAPEN(), FedKD()):
        c = client(alg, "cnn1")
        assert c.upload().keys() == c.shared.state_dict().keys()
        before = {k: v.clone() for k, v in c.private.state_dict().items()}
        c.download({k: torch.zeros_like(v) for k, v in c.upload().items()})
        assert all(torch.equal(before[k], v) for k, v in c.private.state_dict().items())
        assert all((v == 0).all() for v in c.shared.state_dict().values())


def test_svd_compression_is_exact_for_low_rank_and_smaller_on_the_wire() -> None:
    low_rank = torch.randn(64, 1) @ torch.randn(1, 48)
    payload = {"w": low_rank, "b": torch.randn(64)}
    packed = svd_compress(payload, energy=0.99)
    assert packed["w::U"].shape == (64, 1)
    assert payload_bytes(packed) < payload_bytes(payload)
    restored = svd_restore(packed)
    torch.testing.assert_close(restored["w"], low_rank, atol=1e-4, rtol=1e-4)
    assert torch.equal(restored["b"], payload["b"])


def test_fedkd_uploads_compressed_and_restores_on_download() -> None:
    alg = FedKD(svd_energy=0.9)
    a, b = client(alg, "cnn1"), client(alg, "cnn2")
    alg.start([a, b], seed=0, rounds=3)
    for cid, instruction in alg.configure(1, [0, 1]).items():
        [a, b][cid].configure_round(**instruction.settings)
    up = a.upload()
    assert any(k.endswith("::U") for k in up)
    assert payload_bytes(up) < payload_bytes({k: v for k, v in a.shared.state_dict().items()})
    merged = alg.combine(1, [ClientResult(0, up, 1), ClientResult(1, b.upload(), 1)])
    b.download(merged)
    assert b.shared.state_dict().keys() == a.shared.state_dict().keys()


def test_fedkd_energy_grows_from_start_to_end_over_the_run() -> None:
    alg = FedKD(svd_energy=0.95, svd_energy_end=0.98)
    alg.start([client(alg)], seed=0, rounds=4)
    assert [alg.energy(r) for r in (1, 2, 3, 4)] == pytest.approx([0.95, 0.96, 0.97, 0.98])
    assert alg.configure(3, [0])[0].settings == {"energy": pytest.approx(0.97)}
    alg_off = FedKD()
    alg_off.start([client(alg_off)], seed=0, rounds=4)
    assert alg_off.energy(2) is None


def test_fedapen_predicts_with_the_learned_ensemble_weight() -> None:
    c = client(FedAPEN())
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        c.ensemble_logit.fill_(10.0)  # weight ~1: the shared model's prediction
        torch.testing.assert_close(c(x).exp(), c.shared(x).softmax(1), atol=1e-3, rtol=0)
    _, extras = c.predict_with_extras(x)
    assert extras["ensemble_weight"].shape == (3,)
