"""W&B logging never waits on the network."""

from helpers import tiny_config

from fedmoe_pl.cli import main


def test_wandb_online_without_a_server_falls_back_to_offline(tmp_path, caplog, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    config = tiny_config(tmp_path, rounds=1)
    main(["fit", "--config", str(config)])
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert "cannot be reached: logging offline" in caplog.text
