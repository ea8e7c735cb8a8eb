"""The disk client store: clients out of memory between rounds, with results and resumption unchanged."""

from pathlib import Path

import pytest
import torch
from helpers import assert_same_run, client_states, tiny_config

from fedmoe_pl.cli import main
from fedmoe_pl.clients import ClientFiles, DiskClients, MemoryClients
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


@pytest.mark.parametrize("store", ["memory", "disk"])
def test_a_run_killed_while_the_store_writes_a_round_resumes_to_the_same_result(tmp_path, monkeypatch, store) -> None:
    config = tiny_config(tmp_path, rounds=3)
    _fit(config, tmp_path / "straight", "--federation.client_store", store)
    run = tmp_path / "run"
    write = ClientFiles.write
    written: list[tuple[int, int]] = []

    def dies_half_way_through_round_2(self, cid, round_, state):  # type: ignore[no-untyped-def]
        if round_ == 2 and any(r == 2 for _, r in written):
            raise SystemExit(137)  # the process ends here: round 2's files are half written
        written.append((cid, round_))
        write(self, cid, round_, state)

    monkeypatch.setattr(ClientFiles, "write", dies_half_way_through_round_2)
    with pytest.raises(SystemExit):
        _fit(config, run, "--federation.client_store", store)
    assert any(p.name.endswith(".r2.pt") for p in (run / "clients").iterdir())  # newer than the checkpoint
    assert torch.load(run / "last.ckpt", weights_only=False)["round"] == 1
    monkeypatch.setattr(ClientFiles, "write", write)
    _fit(config, run, "--federation.client_store", store, "--resume", str(run))
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


def test_a_run_resumes_with_the_other_client_store_to_the_same_result(tmp_path) -> None:
    config = tiny_config(tmp_path, rounds=3, participation=0.6)
    _fit(config, tmp_path / "straight")
    _fit(config, tmp_path / "run", "--federation.rounds", "1")  # in memory
    _fit(config, tmp_path / "run", "--federation.client_store", "disk", "--resume", str(tmp_path / "run"))
    assert_same_run(tmp_path / "straight", tmp_path / "run")


def test_an_in_memory_checkpoint_writes_only_the_clients_a_round_changed(tmp_path) -> None:
    # 1 of 3 clients a round: each round's checkpoint adds one client file, not three states.
    config = tiny_config(tmp_path, rounds=2, participation=0.3)
    _fit(config, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "last.ckpt", weights_only=False)
    assert set(state["clients"]) == {"version"} and len(state["clients"]["version"]) <= 2
    files = sorted(p.name for p in (tmp_path / "run" / "clients").glob("*.pt"))
    assert files == sorted(f"{cid}.r{v}.pt" for cid, v in state["clients"]["version"].items())
