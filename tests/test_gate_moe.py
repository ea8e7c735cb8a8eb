import lightning as L
import pytest
import torch
from torch import nn

from fedmoe_pl.algorithms import ClientConfig, ClientContext, PFedMoE, PFedMoEClient
from fedmoe_pl.analysis.evaluation import Evaluator
from fedmoe_pl.data import FederatedDataModule, Pathological, Synthetic
from fedmoe_pl.models import GatingNetwork, LocalMoE, SwitchNorm1d, build_model


def test_switch_norm_with_all_weight_on_batch_statistics_is_batch_norm() -> None:
    x = torch.randn(16, 8) * 3 + 1
    sn, bn = SwitchNorm1d(8), nn.BatchNorm1d(8)
    with torch.no_grad():
        sn.mean_logits.copy_(torch.tensor([-50.0, 50.0]))
        sn.var_logits.copy_(torch.tensor([-50.0, 50.0]))
    torch.testing.assert_close(sn(x), bn(x), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sn.running_mean, bn.running_mean)
    torch.testing.assert_close(sn.running_var, bn.running_var)
    sn.eval(), bn.eval()
    torch.testing.assert_close(sn(x), bn(x), atol=1e-4, rtol=1e-4)


def test_switch_norm_with_all_weight_on_layer_statistics_is_layer_norm() -> None:
    x = torch.randn(5, 12) * 2 - 3
    sn = SwitchNorm1d(12)
    with torch.no_grad():
        sn.mean_logits.copy_(torch.tensor([50.0, -50.0]))
        sn.var_logits.copy_(torch.tensor([50.0, -50.0]))
    expected = nn.functional.layer_norm(x, (12,))
    torch.testing.assert_close(sn(x), expected, atol=1e-4, rtol=1e-4)


def test_switch_norm_eval_handles_batch_of_one_like_the_whole_batch() -> None:
    sn = SwitchNorm1d(6)
    for _ in range(20):
        sn(torch.randn(32, 6) * 2 + 5)
    sn.eval()
    x = torch.randn(4, 6) * 2 + 5
    whole = sn(x)
    singles = torch.cat([sn(x[i : i + 1]) for i in range(4)])
    assert torch.isfinite(singles).all()
    torch.testing.assert_close(whole, singles)
    # A batch of one in training mode must not divide by a zero batch variance either.
    sn.train()
    assert torch.isfinite(sn(x[:1])).all()


def test_switch_norm_running_statistics_follow_the_data() -> None:
    sn = SwitchNorm1d(3)
    for _ in range(200):
        sn(torch.randn(64, 3) * 2 + 4)
    torch.testing.assert_close(sn.running_mean, torch.full((3,), 4.0), atol=0.3, rtol=0)
    torch.testing.assert_close(sn.running_var, torch.full((3,), 4.0), atol=0.8, rtol=0)


@pytest.mark.parametrize("norm", ["switch", "batch", "layer", "none"])
def test_gate_weights_are_per_sample_and_sum_to_one(norm: str) -> None:
    gate = GatingNetwork(3 * 16 * 16, hidden=32, norm=norm)  # type: ignore[arg-type]
    w = gate(torch.randn(10, 3, 16, 16))
    assert w.shape == (10, 2)
    torch.testing.assert_close(w.sum(1), torch.ones(10))
    assert (w > 0).all()


def moe_client(gate_lr: float | None = None, model: str = "cnn2") -> PFedMoEClient:
    ctx = ClientContext(0, model, 1, 16, 4, ClientConfig(lr=0.05))
    return PFedMoE(gate_lr=gate_lr).build_client(ctx)


def test_mixture_refuses_experts_of_different_widths() -> None:
    local = build_model("cnn1", 1, 16, 4)
    narrow = nn.Linear(1, 1)
    narrow.out_features = 300
    with pytest.raises(ValueError, match=r"300 wide.*local expert's is 500"):
        LocalMoE(narrow, local.extractor, local.head, in_features=256)


def test_mixture_returns_logits_and_gate_weights() -> None:
    client = moe_client()
    logits, weights = client.moe(torch.randn(6, 1, 16, 16))
    assert logits.shape == (6, 4)
    assert weights.shape == (6, 2)
    torch.testing.assert_close(weights.sum(1), torch.ones(6))


def test_mixture_mixes_the_two_representations_with_the_gate_weights() -> None:
    client = moe_client()
    moe = client.moe.eval()
    x = torch.randn(3, 1, 16, 16)
    _, w = moe(x)
    expected = moe.head(w[:, :1] * moe.global_expert(x) + w[:, 1:] * moe.local_expert(x))
    torch.testing.assert_close(moe(x)[0], expected)


def synthetic_shard(batch_size: int = 32):
    data = FederatedDataModule(
        Synthetic(num_classes=4, image_size=16, train_per_class=64), Pathological(4), 1, batch_size=batch_size
    )
    data.setup(0)
    return data.clients[0]


def test_one_optimizer_step_changes_all_four_parts() -> None:
    client = moe_client()
    shard = synthetic_shard()
    before = {name: [p.detach().clone() for p in part.parameters()] for name, part in client.moe.named_children()}
    optimizer = client.configure_optimizers()
    x, y = next(iter(shard.train_dataloader()))
    loss = client.training_loss(shard.eval_transform(x), y)
    loss.backward()
    optimizer.step()
    assert set(before) == {"global_expert", "local_expert", "gate", "head"}
    for name, part in client.moe.named_children():
        changed = [not torch.equal(a, b) for a, b in zip(before[name], part.parameters())]
        assert any(changed), f"{name} did not change"


def test_gate_can_have_its_own_learning_rate() -> None:
    client = moe_client(gate_lr=0.5)
    groups = client.configure_optimizers().param_groups
    gate_params = {id(p) for p in client.moe.gate.parameters()}
    (gate_group,) = [g for g in groups if {id(p) for p in g["params"]} == gate_params]
    assert gate_group["lr"] == 0.5
    assert sum(len(g["params"]) for g in groups) == len(list(client.parameters()))


def test_only_the_global_expert_is_shared() -> None:
    client, other = moe_client(model="cnn1"), moe_client(model="cnn3")
    payload = client.upload()
    assert payload.keys() == client.moe.global_expert.state_dict().keys()
    assert client.shared is client.moe.global_expert
    private = {k: v.clone() for k, v in other.state_dict().items() if not k.startswith("moe.global_expert.")}
    other.download(payload)
    for key, value in other.moe.global_expert.state_dict().items():
        assert torch.equal(value, payload[key])
    for key, value in other.state_dict().items():
        if key in private:
            assert torch.equal(value, private[key]), key
    # The payload is a copy: training the client afterwards must not alter what was sent.
    with torch.no_grad():
        next(client.moe.global_expert.parameters()).add_(1.0)
    assert not torch.equal(next(iter(payload.values())), next(client.moe.global_expert.parameters()))


def test_trainer_fit_lowers_the_loss_and_the_gate_learns_per_sample_weights() -> None:
    client = moe_client()
    shard = synthetic_shard()
    x, y = next(iter(shard.test_dataloader()))
    x = shard.eval_transform(x)
    with torch.no_grad():
        start = torch.nn.functional.cross_entropy(client.eval()(x), y).item()
    client.train()
    trainer = L.Trainer(
        max_epochs=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(client, datamodule=shard)
    with torch.no_grad():
        end = torch.nn.functional.cross_entropy(client.eval()(x), y).item()
        _, weights = client.moe(x)
    assert end < start * 0.5
    assert weights[:, 0].std() > 1e-3  # data-level: not one pair of weights for the whole client
    assert Evaluator()([client], [shard], num_classes=4)["mean_acc"] > 0.9
