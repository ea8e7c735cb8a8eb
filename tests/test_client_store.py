"""The disk client store: clients out of memory between rounds, with results and resumption unchanged."""

from pathlib import Path

import pytest
import torch
from helpers import assert_same_run, client_states, tiny_config

from fedmoe_pl.cli import main
from fedmoe_pl.clients import DiskClients, MemoryClients
from fedmoe_pl.models import build_model


def _fit(config: Path, run: Path, *argv: str) -> None:
    main(["fit", "--config", str(config), "--federation.run_dir", str(run), *argv])


def test_a_disk_store_run_equals_the_in_memory_run(tmp_path) -> None:
    # 2 of 3 clients per round: some clients sit out rounds and must come back exactly as they left.
    config = tiny_config(tmp_path, rounds=3, participation=0.6)
    _fit(config, tmp_path / "memory")
    _fit(config, tmp_path / "disk", "--federation.client_store", "disk")
    assert_same_run(tmp_path / "memory", tmp_path / "disk")
    files = sorted(p.name for p in (tmp_path / "disk" / "clients").glob("*.pt"))
    # One file per client that trained: the version the checkpoint names, no stale ones.
    version = torch.load(tmp_path / "disk" / "last.ckpt", weights_only=False)["clients"]["version"]
    assert files == sorted(f"{cid}.r{v}.pt" for cid, v in version.items())
    assert set(client_states(tmp_path / "disk")) == set(version)


def test_a_run_killed_while_the_store_writes_a_round_resumes_to_the_same_result(tmp_path, monkeypatch) -> None:
    config = tiny_config(tmp_path, rounds=3)
    _fit(config, tmp_path / "straight", "--federation.client_store", "disk")
    run = tmp_path / "run"
    write = DiskClients._write
    written: list[tuple[int, int]] = []

    def dies_half_way_through_round_2(self, cid, round_, client):  # type: ignore[no-untyped-def]
        if round_ == 2 and any(r == 2 for _, r in written):
            raise SystemExit(137)  # the process ends here: round 2's files are half written
        written.append((cid, round_))
        write(self, cid, round_, client)

    monkeypatch.setattr(DiskClients, "_write", dies_half_way_through_round_2)
    with pytest.raises(SystemExit):
        _fit(config, run, "--federation.client_store", "disk")
    assert any(p.name.endswith(".r2.pt") for p in (run / "clients").iterdir())  # newer than the checkpoint
    assert torch.load(run / "last.ckpt", weights_only=False)["round"] == 1
    monkeypatch.setattr(DiskClients, "_write", write)
    _fit(config, run, "--federation.client_store", "disk", "--resume", str(run))
    assert_same_run(tmp_path / "straight", run)


def test_a_client_loaded_from_the_disk_store_has_the_initial_weights_of_the_memory_pool(tmp_path) -> None:
    def build(cid: int) -> torch.nn.Module:
        model = build_model("cnn3", 1, 16, 4)
        model.client_id = cid  # type: ignore[assignment]
        return model

    torch.manual_seed(3)
    memory = MemoryClients()
    memory.populate(build, 4)  # type: ignore[arg-type]
    after_memory = torch.get_rng_state()
    torch.manual_seed(3)
    disk = DiskClients(tmp_path / "store")
    disk.populate(build, 4)  # type: ignore[arg-type]
    assert torch.equal(torch.get_rng_state(), after_memory)  # later draws are unchanged too
    for cid in (2, 0, 3):  # in any order, and without disturbing the random stream
        loaded = disk[cid]
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), memory[cid].state_dict().values()))
    assert torch.equal(torch.get_rng_state(), after_memory)
    assert sorted(disk.live) == [0, 2, 3] and not list((tmp_path / "store").iterdir())
    disk.release(1)
    assert not disk.live and sorted(p.name for p in (tmp_path / "store").iterdir()) == ["0.r1.pt", "2.r1.pt", "3.r1.pt"]


def test_resuming_with_another_client_store_is_refused(tmp_path, capsys) -> None:
    config = tiny_config(tmp_path, rounds=1)
    _fit(config, tmp_path / "run")
    with pytest.raises(SystemExit) as stop:
        _fit(config, tmp_path / "run", "--federation.client_store", "disk", "--resume", str(tmp_path / "run"))
    assert stop.value.code == 2
    assert "client_store" in capsys.readouterr().err
