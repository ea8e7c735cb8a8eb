"""Text: AG News files in the distributed CSV format, the vocabulary and ids, the text zoo, the gate's
view of a text, and federations of texts end to end."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmoe_pl.algorithms import ClientConfig, ClientContext, PFedMoE
from fedmoe_pl.cli import main
from fedmoe_pl.data import AGNews, Dirichlet, FederatedDataModule, Pathological
from fedmoe_pl.data.inputs import TextInput
from fedmoe_pl.data.text import build_vocabulary, encode, read_csv, words
from fedmoe_pl.models import TEXT_MODELS, TokenBag, available_models, build_model, contract_gaps

ROOT = Path(__file__).resolve().parents[1]
TOPICS = [["war", "minister", "election"], ["game", "team", "coach"], ["stocks", "profit", "bank"],
          ["software", "internet", "space"]]  # fmt: skip
COMMON = ["the", "a", "of", "to", "in", "said", "on", "new"]


def write_ag_news(folder: Path, n_train: int = 400, n_test: int = 80, seed: int = 0) -> None:
    """train.csv and test.csv as distributed: "class","title","description", all fields quoted."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.csv", n_train), ("test.csv", n_test)):
        rows = []
        for _ in range(n):
            c = int(rng.integers(0, 4))
            text = [*rng.choice(TOPICS[c], 3), *rng.choice(COMMON, 6)]
            rng.shuffle(text)
            rows.append([str(c + 1), " ".join(text[:4]).title(), " ".join(text[4:]) + ', "quoted" it\'s'])
        with open(folder / name, "w", newline="") as f:
            csv.writer(f, quoting=csv.QUOTE_ALL).writerows(rows)


def test_words_vocabulary_and_ids_by_hand(tmp_path) -> None:
    path = tmp_path / "train.csv"
    path.write_text('"3","Oil up","oil rises, oil falls"\n"1","War","oil war it\'s"\n"2","Cup","cup final"\n')
    texts, labels = read_csv(path, 4)
    assert labels.tolist() == [2, 0, 1]
    headed = tmp_path / "headed.csv"
    headed.write_text('"Class Index","Title","Description"\n' + path.read_text())
    assert read_csv(headed, 4)[0] == texts  # a copy with a header line reads the same
    assert texts[1] == ["war", "oil", "war", "it's"] and words("Up-to-date: 5G!") == ["up", "to", "date", "5g"]
    # oil 4, war 2, cup 2: by count, ties alphabetically; min_count 2 drops the rest.
    vocabulary = build_vocabulary(texts, max_vocab=10, min_count=2)
    assert vocabulary == ["oil", "cup", "war"]
    assert build_vocabulary(texts, max_vocab=4, min_count=1) == ["oil", "cup"]  # 2 ids for padding and unknown
    ids = encode(texts, vocabulary, seq_len=5)
    assert ids.tolist() == [[2, 1, 2, 1, 2], [4, 2, 4, 1, 0], [3, 3, 1, 0, 0]]


def test_ag_news_loads_with_its_classes_and_a_fingerprinted_vocabulary(tmp_path) -> None:
    write_ag_news(tmp_path / "ag_news_csv")
    data = AGNews(root=str(tmp_path), seq_len=12, max_vocab=50).load()
    assert data.train_images.shape == (400, 12) and data.test_images.shape == (80, 12)
    assert data.classes == ["World", "Sports", "Business", "Sci/Tech"] and data.num_classes == 4
    assert data.sample == TextInput(vocab_size=int(data.train_images.max()) + 1, length=12)
    again = AGNews(root=str(tmp_path), seq_len=12, max_vocab=50).load()
    assert torch.equal(again.train_images, data.train_images) and again.identity == data.identity
    assert AGNews(root=str(tmp_path), seq_len=12, max_vocab=20).load().identity != data.identity


def test_bad_ag_news_files_are_named(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train.csv, test.csv not found .* download is off"):
        AGNews(root=str(tmp_path)).load()
    write_ag_news(tmp_path)
    lines = (tmp_path / "train.csv").read_text().splitlines()
    lines[3] = '"9","title","text"'
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train.csv:4: \['9', 'title', 'text'\] is not a row of the AG News format"):
        AGNews(root=str(tmp_path)).load()
    for row, shown, count in (
        ('"2","title only"', "['2', 'title only']", 2),
        ('"2","a","b","c"', "['2', 'a', 'b']", 4),
    ):
        lines[3] = row  # the format has exactly three fields: class, title, description
        (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
        with pytest.raises(
            ValueError, match=re.escape(f"train.csv:4: {shown} is not a row of the AG News format")
        ) as err:
            AGNews(root=str(tmp_path)).load()
        assert f"this row has {count})" in str(err.value)
    with pytest.raises(ValueError, match="seq_len=0 must be an integer of at least 1"):
        AGNews(seq_len=0)


@pytest.mark.parametrize("name", TEXT_MODELS)
def test_every_text_model_keeps_the_zoo_contract_and_ignores_padding(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=4, inputs=TextInput(vocab_size=30, length=16)).eval()
    assert contract_gaps(model) == [] and model.feature_dim == 64
    ids = torch.tensor([[5, 9, 2, 7, 0, 0, 0, 0], [3, 3, 0, 0, 0, 0, 0, 0]])
    longer = torch.cat([ids, torch.zeros(2, 8, dtype=torch.long)], dim=1)  # more padding changes nothing
    with torch.no_grad():
        assert model(ids).shape == (2, 4)
        assert torch.allclose(model.forward_features(ids), model.forward_features(longer), atol=1e-5)
        assert torch.isfinite(model(torch.zeros(1, 8, dtype=torch.long))).all()  # an empty text


def test_the_text_zoo_is_heterogeneous_and_refused_on_images() -> None:
    sizes = {n: sum(p.numel() for p in build_model(n, inputs=TextInput(1000, 64)).parameters()) for n in TEXT_MODELS}
    assert min(sizes, key=sizes.get) == "bag" and len(set(sizes.values())) == 4
    assert available_models("text") == sorted(TEXT_MODELS)
    with pytest.raises(ValueError, match=r"model 'gru' reads text inputs but the data gives 3x32x32 images"):
        build_model("gru", 3, 32, 10)


def test_the_gate_reads_a_text_as_its_hashed_bag_of_words() -> None:
    bag = TokenBag(buckets=4)(torch.tensor([[5, 9, 2, 6, 0, 0], [0, 0, 0, 0, 0, 0]]))
    assert bag.tolist() == [[0.0, 0.5, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]  # 5, 9 -> 1; 2, 6 -> 2; of 4 words
    ctx = ClientContext(0, "textcnn", 0, 0, 4, ClientConfig(zoo=["textcnn"]), inputs=TextInput(100, 16))
    client = PFedMoE().build_client(ctx)
    assert client.moe.gate.net[0].in_features == 256 and type(client.moe.global_expert).__name__ == "BagExtractor"
    weights = client.moe.gate(torch.randint(0, 100, (3, 16)))
    assert weights.shape == (3, 2) and torch.allclose(weights.sum(1), torch.ones(3))


@pytest.mark.parametrize("partitioner", [Pathological(2), Dirichlet(0.5, min_samples=5)])
def test_image_partitioners_cut_texts_too(tmp_path, partitioner) -> None:
    write_ag_news(tmp_path)
    dm = FederatedDataModule(AGNews(root=str(tmp_path), seq_len=10), partitioner, 4, batch_size=8)
    dm.setup(1)
    ids, labels = next(iter(dm.clients[0].train_batches()))
    assert ids.dtype == torch.int64 and ids.shape[1] == 10 and len(labels) == 8
    assert sum(dm.sizes(i)[0] for i in range(4)) == 400
    if isinstance(partitioner, Pathological):
        assert all(len(c["train"]) == 2 for c in dm.report()["clients"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pfedmoe", "standalone", "fml"])
def test_two_rounds_of_text(tmp_path, method: str) -> None:
    write_ag_news(tmp_path / "data" / "ag_news_csv")
    args = ["fit", "--config", str(ROOT / "configs" / "agnews.yaml")]
    if method != "pfedmoe":
        args += ["--config", str(ROOT / "configs" / "methods" / f"{method}.yaml")]
    args += ["--data.source.init_args.root", str(tmp_path / "data"), "--data.num_clients", "4"]
    args += ["--federation.rounds", "2", "--federation.run_dir", str(tmp_path / method), "--trainer.accelerator", "cpu"]
    main(args)
    summary = json.loads((tmp_path / method / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert [c["model"] for c in summary["clients"]] == ["bag", "textcnn", "gru", "transformer"]
    assert 0 <= summary["final_mean_acc"] <= 1


def test_a_malformed_row_ends_a_fit_in_one_line_exit_2(tmp_path, capsys) -> None:
    write_ag_news(tmp_path / "ag_news_csv")
    path = tmp_path / "ag_news_csv" / "test.csv"
    path.write_text(path.read_text() + '"World","no class"\n')
    args = ["fit", "--config", str(ROOT / "configs" / "agnews.yaml"), "--data.source.init_args.root", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        main([*args, "--federation.run_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1 and "test.csv:81: ['World', 'no class']" in err
    assert not (tmp_path / "run").exists()
