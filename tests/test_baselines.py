import pytest
import torch

from fedmoe_pl.aggregation import payload_bytes
from fedmoe_pl.algorithms import (
    FD,
    FML,
    Algorithm,
    ClassStats,
    ClientConfig,
    ClientContext,
    FedAPEN,
    FedAvg,
    FedGH,
    FedKD,
    FedProto,
    LGFedAvg,
    PFedMoE,
    Standalone,
    svd_compress,
    svd_restore,
)
from fedmoe_pl.data import IID, FederatedDataModule, Synthetic
from fedmoe_pl.federation import Federation, FederationConfig

HETERO = ["cnn5", "cnn4", "cnn3"]
METHODS = {
    "pfedmoe": PFedMoE(gate_hidden=16),
    "standalone": Standalone(),
    "fedavg": FedAvg(),
    "lg_fedavg": LGFedAvg(),
    "fedgh": FedGH(),
    "fd": FD(),
    "fedproto": FedProto(),
    "fml": FML(),
    "fedkd": FedKD(svd_energy=0.95),
    "fedapen": FedAPEN(),
}


def client(alg: Algorithm, model: str = "cnn5", cid: int = 0, classes: int = 4):
    return alg.build_client(ClientContext(cid, model, 1, 16, classes, ClientConfig(zoo=[model])))


def federation(alg: Algorithm, tmp_path, zoo=HETERO, rounds=2) -> Federation:
    data = FederatedDataModule(Synthetic(num_classes=3, train_per_class=90), IID(), 3, batch_size=16)
    data.setup(0)
    cfg = FederationConfig(rounds=rounds, local_epochs=2, run_dir=str(tmp_path))
    fed = Federation(cfg, data, ClientConfig(zoo=zoo, lr=0.02), alg, seed=0, trainer_kwargs={"accelerator": "cpu"})
    fed.run_dir.acquire()
    return fed


@pytest.mark.parametrize("name", sorted(METHODS))
def test_two_round_federation_runs_and_counts_what_is_sent(name, tmp_path) -> None:
    alg = METHODS[name]
    zoo = ["cnn5"] if name == "fedavg" else HETERO
    fed = federation(alg, tmp_path, zoo)
    sizes = []
    original_upload = [c.upload for c in fed.clients]
    for c, up in zip(fed.clients, original_upload):
        c.upload = lambda up=up: (sizes.append(payload_bytes(p := up())), p)[1]  # type: ignore[method-assign]
    records = fed.run()
    assert [r["round"] for r in records] == [1, 2]
    assert fed.totals["bytes_up"] == sum(sizes)
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


def test_lg_fedavg_shares_only_the_header() -> None:
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


def test_fedgh_server_trains_the_global_header_on_uploaded_representations() -> None:
    alg = FedGH(server_lr=0.5, server_epochs=20)
    c = client(alg, classes=2)
    start = alg.initial_global([c])
    reps = torch.zeros(2, 500)
    reps[0, :10], reps[1, 10:20] = 1.0, 1.0  # two separable class representations
    uploads = [
        {"means": reps[:1].clone().repeat(2, 1) * torch.tensor([[1.0], [0.0]]), "counts": torch.tensor([5, 0])},
        {"means": reps.clone(), "counts": torch.tensor([3, 4])},
    ]
    header = alg.aggregate(uploads, [5, 7], start)
    assert header.keys() == {"weight", "bias"}
    logits = reps @ header["weight"].T + header["bias"]
    assert logits.argmax(1).tolist() == [0, 1]
    c.download(header)
    assert torch.equal(c.model.head.weight, header["weight"])


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
    # Only sample 0's class is known: 2 * mean((1-3)^2, 0, 0) = 2 * 4/3.
    torch.testing.assert_close(c.regulariser(torch.zeros(2, 500), logits, y), torch.tensor(8 / 3))


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
    up = a.upload()
    assert any(k.endswith("::U") for k in up)
    assert payload_bytes(up) < payload_bytes({k: v for k, v in a.shared.state_dict().items()})
    merged = alg.aggregate([up, b.upload()], [1, 1], up)
    b.download(merged)
    assert b.shared.state_dict().keys() == a.shared.state_dict().keys()


def test_fedapen_predicts_with_the_learned_ensemble_weight() -> None:
    c = client(FedAPEN())
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        c.ensemble_logit.fill_(10.0)  # weight ~1: the shared model's prediction
        torch.testing.assert_close(c(x).exp(), c.shared(x).softmax(1), atol=1e-3, rtol=0)
    _, extras = c.predict_with_extras(x)
    assert extras["ensemble_weight"].shape == (3,)
