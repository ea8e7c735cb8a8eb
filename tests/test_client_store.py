"""The disk client store: clients out of memory between rounds, with results and resumption unchanged."""

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_same_run, client_states, tiny_config

from fedmoe_pl.cli import main
from fedmoe_pl.fleets.clients import ClientFiles, DiskClients, MemoryClients
from fedmoe_pl.models import build_model


def _files(run: Path, folder: str = "clients") -> set[str]:
    return {p.name for p in (run / folder).glob("*.pt")}


def _named(run: Path) -> set[str]:
    """The client files the run's last and previous checkpoints name."""
    names = set()
    for name in ("last.ckpt", "previous.ckpt"):
        version = torch.load(run / name, weights_only=False)["clients"]["version"]
        names |= {f"{cid}.r{v}.pt" for cid, v in version.items()}
    return names


def _fit(config: Path, run: Path, *argv: str) -> None:
    main(["fit", "--config", str(config), "--federation.run_dir", str(run), *argv])


def test_a_disk_store_run_equals_the_in_memory_run(tmp_path) -> None:
    # 2 of 3 clients per round: some clients sit out rounds and must come back exactly as they left.
    config = tiny_config(tmp_path, rounds=3, participation=0.6)
    _fit(config, tmp_path / "memory")
    _fit(config, tmp_path / "disk", "--federation.client_store", "disk")
    assert_same_run(tmp_path / "memory", tmp_path / "disk")
    # The versions the last two checkpoints name, no stale ones: the previous checkpoint stays resumable.
    version = torch.load(tmp_path / "disk" / "last.ckpt", weights_only=False)["clients"]["version"]
    assert _files(tmp_path / "disk") == _named(tmp_path / "disk")
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
    def build(cid: int) -> torch.nn.Module:  # weights a pure function of the id, as the run's builder makes them
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(100 + cid)
            model = build_model("cnn3", 1, 16, 4)
        model.client_id = cid  # type: ignore[assignment]
        return model

    torch.manual_seed(3)
    before = torch.get_rng_state()
    memory, disk = MemoryClients(), DiskClients(tmp_path / "store")
    memory.populate(build, 4)  # type: ignore[arg-type]
    disk.populate(build, 4)  # type: ignore[arg-type]
    assert not memory.clients and not disk.live  # nothing is built before it is used
    for cid in (2, 0, 3):  # in any order
        loaded = disk[cid]
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), memory[cid].state_dict().values()))
    assert sorted(memory.clients) == [0, 2, 3]  # client 1 was never used: never built
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random stream is untouched
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
    assert _files(tmp_path / "run") == _named(tmp_path / "run")


def _named_by(run: Path, checkpoint: str) -> dict[int, int]:
    return torch.load(run / checkpoint, weights_only=False)["clients"]["version"]


@pytest.mark.parametrize("loss", ["empty", "missing", "truncated"])
@pytest.mark.parametrize("store", ["memory", "disk"])
def test_after_a_power_loss_the_run_resumes_from_the_previous_checkpoint(tmp_path, caplog, store, loss) -> None:
    """What a file system may leave after a power loss: the last checkpoint written, a client file it
    names empty, missing or cut short. The versions the previous checkpoint names are still there."""
    config = tiny_config(tmp_path, rounds=4)
    _fit(config, tmp_path / "straight", "--federation.client_store", store)
    run = tmp_path / "run"
    _fit(config, run, "--federation.client_store", store, "--federation.rounds", "3")
    last = _named_by(run, "last.ckpt")
    victim = run / "clients" / f"1.r{last[1]}.pt"
    if loss == "empty":
        victim.write_bytes(b"")
    elif loss == "missing":
        victim.unlink()
    else:
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    (run / "clients" / ".1.abc123.tmp").write_bytes(b"half a file")  # what kill -9 leaves mid-write
    _fit(config, run, "--federation.client_store", store, "--resume", str(run))
    assert "resuming from the previous checkpoint, round 2" in caplog.text
    assert_same_run(tmp_path / "straight", run)
    assert not list((run / "clients").glob("*.tmp"))


def test_a_resume_whose_client_files_are_all_lost_is_refused_in_one_line_and_changes_nothing(
    tmp_path, capsys, monkeypatch
) -> None:
    from helpers import snapshot

    monkeypatch.setenv("WANDB_MODE", "offline")  # a refused resume must not start (or touch) a W&B run
    config = tiny_config(tmp_path, rounds=2)
    run = tmp_path / "run"
    _fit(config, run)
    for path in (run / "clients").glob("1.r*.pt"):
        path.write_bytes(b"")
    assert (run / "wandb").is_dir()
    before = snapshot(tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        _fit(config, run, "--resume", str(run), "--federation.rounds", "3")
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing or damaged" in err and "1.r2.pt (empty)" in err
    assert snapshot(tmp_path) == before  # config.yaml, partition.json, the W&B folder: untouched


def test_a_damaged_client_file_met_during_a_run_is_named_in_one_line(tmp_path, capsys) -> None:
    config = tiny_config(tmp_path, rounds=2, participation=0.3)
    run = tmp_path / "run"
    _fit(config, run, "--federation.client_store", "disk", "--federation.rounds", "1")
    (cid, version), *_ = _named_by(run, "last.ckpt").items()
    path = run / "clients" / f"{cid}.r{version}.pt"
    from fedmoe_pl.fleets.clients import ClientFiles

    files = ClientFiles(run / "clients")
    files.restore({"version": {cid: version}})
    path.write_bytes(path.read_bytes()[:100])
    from fedmoe_pl.errors import RunError

    with pytest.raises(RunError, match=r"is damaged \(truncated\)"):
        files.read(cid)


def test_runs_sharing_a_client_store_dir_keep_their_own_files(tmp_path) -> None:
    config = tiny_config(tmp_path, rounds=2)
    shared = tmp_path / "store"
    for name in ("a", "b"):
        _fit(config, tmp_path / name, "--federation.client_store", "disk", "--federation.client_store_dir", str(shared))
    folders = sorted(p.name for p in shared.iterdir())
    assert len(folders) == 2 and folders[0].startswith("a-") and folders[1].startswith("b-")
    for name, folder in zip(("a", "b"), folders):
        assert _files(shared, folder) == {
            f"{c}.r{v}.pt" for c, v in _named_by(tmp_path / name, "last.ckpt").items()
        } | {f"{c}.r{v}.pt" for c, v in _named_by(tmp_path / name, "previous.ckpt").items()}
    _fit(
        config,
        tmp_path / "a",
        "--federation.client_store",
        "disk",
        "--federation.client_store_dir",
        str(shared),
        "--federation.rounds",
        "3",
        "--resume",
        str(tmp_path / "a"),
    )
    _fit(config, tmp_path / "ref", "--federation.rounds", "3")
    metrics = [[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in ("ref", "a")]
    assert [m["per_client"]["client_acc"] for m in metrics[0]] == [m["per_client"]["client_acc"] for m in metrics[1]]
    assert [m["train_loss"] for m in metrics[0]] == [m["train_loss"] for m in metrics[1]]


def test_follower_ranks_keep_their_disk_store_beside_rank_zero_s(tmp_path) -> None:
    from fedmoe_pl.fleets.distributed import ProcessGroup
    from fedmoe_pl.run.experiment import client_pool, store_directory
    from fedmoe_pl.run.schedule import FederationConfig

    cfg = FederationConfig(run_dir=str(tmp_path / "run"), client_store="disk", client_store_dir=str(tmp_path / "s"))
    group = ProcessGroup.from_env(
        {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    )
    assert group is not None and not group.leader
    pool = client_pool(cfg, group)
    assert isinstance(pool, DiskClients)
    assert pool.directory == store_directory(cfg) / "rank1"
    assert str(pool.directory).startswith(str(tmp_path))


def test_a_damaged_last_checkpoint_resumes_from_the_previous_one(tmp_path, caplog) -> None:
    config = tiny_config(tmp_path, rounds=3)
    _fit(config, tmp_path / "straight")
    run = tmp_path / "run"
    _fit(config, run, "--federation.rounds", "2")
    last = run / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])  # power loss: the last checkpoint cut short
    _fit(config, run, "--federation.rounds", "3", "--resume", str(run))
    assert "resuming from previous.ckpt" in caplog.text
    assert_same_run(tmp_path / "straight", run)
