import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_same_run, client_states, tiny_config

from fedmoe_pl.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def parse(*argv: str):
    parser = build_parser()
    cfg = parser.parse_args(["fit", *argv])
    return parser, cfg


def test_help_answers(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    assert "fit" in capsys.readouterr().out


def test_print_config_shows_the_resolved_values(capsys) -> None:
    with pytest.raises(SystemExit):
        main(
            ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--federation.rounds", "9", "--print_config"]
        )
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["federation"]["rounds"] == 9
    assert printed["algorithm"]["class_path"].endswith("PFedMoE")


def run_fit(capsys, *argv: str) -> str:
    main(["fit", *argv])
    return capsys.readouterr().out


def test_end_to_end_three_clients_two_rounds(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = tiny_config(tmp_path)
    run = tmp_path / "run"
    run_fit(capsys, "--config", str(config), "--federation.rounds", "1")
    after_one = torch.load(run / "last.ckpt", weights_only=False)
    out = run_fit(capsys, "--config", str(config), "--resume", str(run))
    state = torch.load(run / "last.ckpt", weights_only=False)

    globals_ = [
        {k[len("moe.global_expert.") :]: v for k, v in c.items() if k.startswith("moe.global_expert.")}
        for c in client_states(run).values()
    ]
    for g in globals_:  # identical on every client after the broadcast, and equal to the server's
        assert g.keys() == state["server"]["global"].keys()
        assert all(torch.equal(g[k], state["server"]["global"][k]) for k in g)
    assert any(
        not torch.equal(state["server"]["global"][k], after_one["server"]["global"][k])
        for k in state["server"]["global"]
    )
    local = [c["moe.head.weight"] for c in client_states(run).values()]
    assert not torch.equal(local[0], local[1])

    summary = json.loads((run / "summary.json").read_text())
    assert f"final mean client test accuracy: {summary['final_mean_acc']:.4f}" in out
    assert summary["rounds"] == 2 and summary["best_round"] in (1, 2)
    assert [c["model"] for c in summary["clients"]] == ["cnn5", "cnn4", "cnn3"]
    shared = summary["clients"][0]["params_shared"]
    assert all(c["params_shared"] == shared for c in summary["clients"])
    assert summary["total_bytes_up"] == 2 * 3 * shared * 4
    assert all(c["params_total"] > shared for c in summary["clients"])
    for key in ("final_mean_acc", "best_mean_acc", "total_bytes_down", "wall_s", "partition_fingerprint"):
        assert summary[key] is not None

    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2]
    for key in ("mean_acc", "weighted_acc", "bytes_up", "bytes_down", "wall_s"):
        assert key in metrics[0]
    assert {"client_acc", "client_gate_global", "gate_global_spread"} <= set(metrics[0]["per_client"])
    partition = json.loads((run / "partition.json").read_text())
    assert partition["fingerprint"] == summary["partition_fingerprint"]
    assert [sorted(c["train"]) for c in partition["clients"]] == [["0", "1"], ["2", "3"], ["4", "5"]]
    assert yaml.safe_load((run / "config.yaml").read_text())["seed_everything"] == 7
    assert list((run / "wandb").glob("offline-run-*"))


def test_resumed_run_equals_an_uninterrupted_one(tmp_path, capsys) -> None:
    config = tiny_config(tmp_path, rounds=3)
    straight = tmp_path / "straight"
    run_fit(capsys, "--config", str(config), "--federation.run_dir", str(straight))
    broken = tmp_path / "broken"
    run_fit(capsys, "--config", str(config), "--federation.run_dir", str(broken), "--federation.rounds", "1")
    run_fit(capsys, "--config", str(config), "--federation.run_dir", str(broken), "--resume", str(broken))
    assert_same_run(straight, broken)


def test_resume_with_a_result_changing_config_is_refused(tmp_path, capsys) -> None:
    config = tiny_config(tmp_path, rounds=1)
    run_fit(capsys, "--config", str(config))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config), "--seed_everything", "8", "--resume", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert "refusing to resume" in err and "seed_everything: 7 in the run, 8 now" in err


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--client.zoo", "[cnn1, cnn7]"], "cnn7"),
        (["--federation.participation", "1.5"], "1.5"),
        (["--federation.participation", "0"], "participation"),
        (["--federation.rounds", "0"], "rounds"),
        (
            [
                "--data.source.init_args.root",
                "/nonexistent/fm",
                "--data.source.init_args.system_dir",
                "/nonexistent/sys",
            ],
            "/nonexistent/fm",
        ),
    ],
)
def test_bad_input_fails_before_training_naming_the_value(tmp_path, capsys, argv, match) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "fit",
                "--config",
                str(ROOT / "configs" / "quickstart.yaml"),
                "--federation.run_dir",
                str(tmp_path / "run"),
                *argv,
            ]
        )
    assert exit_.value.code != 0
    assert match in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_finished_run_is_not_overwritten_without_resume(tmp_path, capsys) -> None:
    config = tiny_config(tmp_path, rounds=1)
    run_fit(capsys, "--config", str(config))
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config)])
    assert "already holds a run" in capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_misspelled_config_key_is_named(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation:\n  roundz: 3\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(bad)])
    assert "roundz" in capsys.readouterr().err


def test_partition_command_writes_report_and_heatmap(tmp_path, capsys) -> None:
    config = tiny_config(tmp_path)
    main(["partition", "--config", str(config), "--output", str(tmp_path / "p")])
    report = json.loads((tmp_path / "p" / "partition.json").read_text())
    assert set(report) == {"fingerprint", "num_classes", "classes", "clients"}
    assert report["num_classes"] == 6 and report["classes"] == ["0", "1", "2", "3", "4", "5"]  # synthetic: no names
    assert report["clients"][2] == {"id": 2, "train": {"4": 40, "5": 40}, "test": {"4": 20, "5": 20}}
    assert (tmp_path / "p" / "partition.png").read_bytes()[:4] == b"\x89PNG"
    assert report["fingerprint"] in capsys.readouterr().out
