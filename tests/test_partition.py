import subprocess
import sys

import numpy as np
import pytest

from fedmoe_pl.data import IID, Dirichlet, FederatedDataModule, Pathological, Synthetic, assign


def make(partitioner, num_clients=10, split="paper", seed=0, **source):
    dm = FederatedDataModule(Synthetic(**source), partitioner, num_clients, split=split)
    dm.setup(seed)
    return dm


def labels_of(dm, part="train"):
    return [set(getattr(c, f"{part}_labels").tolist()) for c in dm.clients]


@pytest.mark.parametrize("partitioner", [Pathological(2), Pathological(3, balanced=False), Dirichlet(0.3, 5), IID()])
def test_same_seed_same_partition_other_seed_other_fingerprint(partitioner) -> None:
    a, b, c = make(partitioner, seed=1), make(partitioner, seed=1), make(partitioner, seed=2)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    assert a.label_counts() == b.label_counts()


def test_fingerprint_is_the_same_in_another_process() -> None:
    code = (
        "from fedmoe_pl.data import *;"
        "dm = FederatedDataModule(Synthetic(), Dirichlet(0.5, 5), 7); dm.setup(3); print(dm.fingerprint)"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    dm = FederatedDataModule(Synthetic(), Dirichlet(0.5, 5), 7)
    dm.setup(3)
    assert other.stdout.strip() == dm.fingerprint


@pytest.mark.parametrize("partitioner", [Dirichlet(0.1, 3), IID(), Pathological(2, balanced=False)])
def test_indices_are_disjoint_and_cover_everything(partitioner) -> None:
    labels = np.random.default_rng(0).integers(0, 10, 1000)
    rng = np.random.default_rng(1)
    counts = partitioner.counts(np.bincount(labels, minlength=10), 10, rng)
    parts = assign(labels, counts, rng)
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined)) == 1000  # N*k = C*2: every class is held
    for part, row in zip(parts, counts):
        assert np.array_equal(np.bincount(labels[part], minlength=10), row)


def test_pathological_clients_hold_exactly_their_classes_in_train_and_test() -> None:
    dm = make(Pathological(2), num_clients=10)
    train, test = labels_of(dm), labels_of(dm, "test")
    assert train == test
    assert all(len(s) == 2 for s in train)
    assert train[0] == {0, 1} and train[1] == {2, 3} and train[5] == {0, 1}  # the documented rule
    # Balanced: a class's 60 samples go 30/30 to its two holders.
    assert {n for row in dm.label_counts() for n in row["train"].values()} == {30}


def test_balanced_leftovers_do_not_pile_on_one_client() -> None:
    counts = Pathological(1).counts(np.array([13]), 1, np.random.default_rng(0))
    assert counts.tolist() == [[13]]
    counts = IID().counts(np.array([13, 13, 13, 13]), 4, np.random.default_rng(0))
    assert counts.sum(0).tolist() == [13] * 4
    assert (counts.max(0) - counts.min(0) <= 1).all()  # each class split as evenly as possible
    assert counts.sum(1).max() < 13 + 4  # the four classes' leftovers did not all land on one client


def test_dirichlet_guarantees_the_minimum_without_redrawing() -> None:
    class_counts = np.full(10, 100)
    for seed in range(20):
        counts = Dirichlet(alpha=0.05, min_samples=40).counts(class_counts, 20, np.random.default_rng(seed))
        assert counts.sum(1).min() >= 40
        assert counts.sum(0).tolist() == class_counts.tolist()
        assert (counts >= 0).all()


def test_dirichlet_paper_split_gives_test_sets_the_train_class_mix() -> None:
    dm = make(Dirichlet(0.3, 5), num_clients=5, train_per_class=200, test_per_class=100)
    for row in dm.label_counts():
        assert set(row["test"]) <= set(row["train"])


def test_pooled_split_uses_the_train_fraction_of_each_share() -> None:
    dm = FederatedDataModule(Synthetic(), IID(), 4, split="pooled", train_fraction=0.75)
    dm.setup(0)
    total = sum(c.num_train + c.num_test for c in dm.clients)
    assert total == 10 * (60 + 20)
    for c in dm.clients:
        assert c.num_train == round(0.75 * (c.num_train + c.num_test))


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: make(Pathological(11)), r"classes_per_client=11 but the data has 10 classes"),
        (lambda: make(Dirichlet(alpha=0.0)), r"alpha must be > 0, got 0.0"),
        (lambda: make(IID(), num_clients=700), r"num_clients=700 exceeds the 600 available samples"),
        (lambda: make(Dirichlet(1.0, min_samples=100)), r"min_samples=100 for 10 clients"),
        (lambda: FederatedDataModule(Synthetic(), IID(), split="mixed"), r"split='mixed'"),
    ],
)
def test_bad_settings_fail_with_the_value(build, match) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_a_shard_is_cut_only_when_first_used_and_counts_need_none() -> None:
    dm = FederatedDataModule(Synthetic(num_classes=4, train_per_class=30), Pathological(2), 6)
    dm.setup(0)
    counts = dm.label_counts()
    sizes = [dm.sizes(cid) for cid in range(6)]
    assert not dm.clients.made  # type: ignore[attr-defined]  # counting cut nothing
    shard = dm.clients[4]
    assert list(dm.clients.made) == [4] and dm.clients[4] is shard  # type: ignore[attr-defined]
    assert (shard.num_train, shard.num_test) == sizes[4]
    assert {str(c): n for c, n in enumerate(np.bincount(shard.train_labels.numpy(), minlength=4)) if n} == counts[4][
        "train"
    ]
    assert len(dm.clients) == 6 and [s.num_train for s in dm.clients] == [n for n, _ in sizes]


def test_a_range_of_class_counts_draws_each_client_s_count_from_the_seed() -> None:
    partitioner = Pathological([2, 5])
    dm = make(partitioner, num_clients=12, num_classes=8, train_per_class=60, test_per_class=30)
    train, test = labels_of(dm), labels_of(dm, "test")
    assert train == test  # the paper's test split: the same classes in train and test
    ks = [len(s) for s in train]
    assert all(2 <= k <= 5 for k in ks) and len(set(ks)) > 1  # drawn, not all alike
    # The documented rule with the drawn counts: client i takes the next k_i classes after client i - 1's.
    offset = 0
    for held, k in zip(train, ks):
        assert held == {(offset + j) % 8 for j in range(k)}
        offset += k
    assert [len(row["train"]) for row in dm.report()["clients"]] == ks  # partition.json lists them
    again, other = (
        make(Pathological([2, 5]), 12, seed=0, num_classes=8),
        make(Pathological([2, 5]), 12, seed=1, num_classes=8),
    )
    assert [len(s) for s in labels_of(again)] == ks and [len(s) for s in labels_of(other)] != ks


def test_one_class_count_per_client_is_taken_as_given() -> None:
    dm = make(Pathological([1, 3, 2, 4]), num_clients=4, num_classes=6)
    assert labels_of(dm) == [{0}, {1, 2, 3}, {4, 5}, {0, 1, 2, 3}]
    assert labels_of(dm) == labels_of(dm, "test")


def test_one_count_for_all_clients_keeps_its_partition() -> None:
    """The int form draws nothing more than before: its partitions are the ones already pinned."""
    a = make(Pathological(2), num_clients=10)
    b = make(Pathological([2, 2, 2, 2, 2, 2, 2, 2, 2, 2]), num_clients=10)
    assert a.fingerprint == b.fingerprint


@pytest.mark.parametrize(
    ("given", "clients", "message"),
    [
        ([2, 11], 10, r"classes_per_client=\[2, 11\] but the data has 10 classes"),
        ([5, 2], 10, r"low above high"),
        ([0, 3], 10, r"between 1 and 10"),
        ([1, 2, 3], 4, r"lists 3 counts for 4 clients"),
        ([2, 2, 12], 3, r"classes_per_client=\[2, 2, 12\] but the data has 10 classes"),
    ],
)
def test_class_counts_that_cannot_work_are_refused(given, clients, message) -> None:
    with pytest.raises(ValueError, match=message):
        make(Pathological(given), num_clients=clients)


def test_accuracy_by_class_count_pools_the_clients_holding_that_many_classes(tmp_path, monkeypatch, capsys) -> None:
    import json
    import runpy
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    accs = {0: [0.9, 0.5, 0.7, 0.6], 1: [0.8, 0.4, 0.3, 0.2]}  # seed -> client accuracies
    counts = {}
    for seed, client_acc in accs.items():
        dm = make(Pathological([2, 5]), num_clients=4, seed=seed)
        report = dm.report()
        counts[seed] = [len(c["train"]) for c in report["clients"]]
        run = tmp_path / "grid" / f"quickstart-pfedmoe-seed{seed}"
        run.mkdir(parents=True)
        (run / "partition.json").write_text(json.dumps(report))
        (run / "cell.json").write_text(json.dumps({"axes": {"data": "quickstart", "method": "pfedmoe"}, "seed": seed}))
        (run / "summary.json").write_text(json.dumps({"status": "completed"}))
        rows = [{"round": 1, "mean_acc": 0.1, "per_client": {"client_acc": {str(i): 0.1 for i in range(4)}}}]
        final = {str(i): a for i, a in enumerate(client_acc)}
        rows.append({"round": 2, "mean_acc": 0.5, "per_client": {"client_acc": final}})
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    expected = {}
    for seed, client_acc in accs.items():
        for k, a in zip(counts[seed], client_acc, strict=True):
            expected.setdefault(k, []).append(a * 100)
    monkeypatch.setattr("sys.argv", ["by_class_count.py", str(tmp_path / "grid")])
    runpy.run_path(str(root / "experiments" / "by_class_count.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "| method | seeds | " + " | ".join(f"{k} classes" for k in sorted(expected)) + " | all clients |" in out
    cells = next(line for line in out.splitlines() if line.startswith("| pfedmoe | 2 |")).strip(" |").split(" | ")[2:]
    assert len(cells) == len(expected) + 1  # a cell per class count, then all clients
    for cell, k in zip(cells, sorted(expected)):
        values = np.asarray(expected[k])
        std = values.std(ddof=1) if len(values) > 1 else 0.0
        assert cell == f"{values.mean():.1f} ± {std:.1f} ({len(values)})"
    everyone = np.asarray([a * 100 for seed in accs for a in accs[seed]])
    assert cells[-1] == f"{everyone.mean():.1f} ± {everyone.std(ddof=1):.1f} (8)"
