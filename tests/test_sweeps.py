"""W&B sweeps without a W&B server: the shipped sweep files, the argv wandb's agent builds, a real agent loop."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import RecordingTracker, assert_same_run, tiny_config

from fedmoe_pl.cli import build_parser, main, subcommand_parser
from fedmoe_pl.run.tracking import WandbConfig, WandbTracker, resolve_mode

sweeps = pytest.importorskip("sweeps", reason="the sweep tests need W&B's sweeps package (pip install .[dev])")
wandb_agent = pytest.importorskip("wandb.wandb_agent")

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))
LIMIT = 12  # suggestions checked per random or Bayesian sweep; a grid is checked whole


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def suggestions(sweep: dict[str, Any], limit: int) -> list[dict[str, Any]]:
    """The run configs W&B's own engine proposes, as the server would send them (plain JSON)."""
    runs: list[Any] = []
    while len(runs) < limit:
        run = sweeps.next_run(sweep, runs, validate=False)  # validation would drop nested parameters
        if run is None:  # a grid is exhausted
            break
        run.state = sweeps.RunState.finished
        run.summary_metrics = {sweep["metric"]["name"]: 0.5 + 0.01 * len(runs)}  # something for bayes to fit
        runs.append(run)
    return [json.loads(json.dumps(r.config, default=lambda o: o.item())) for r in runs]


def agent_argv(sweep: dict[str, Any], args: dict[str, Any], monkeypatch, tmp_path: Path) -> list[str]:
    """The command wandb's agent (``Agent._command_run``) would start for one suggestion."""
    started: list[list[str]] = []

    class Recorder:
        def __init__(self, command: list[str] | None = None, **_: Any) -> None:
            started.append(list(command or []))

    monkeypatch.setattr(wandb_agent, "AgentProcess", Recorder)
    for key, value in (("WANDB_SWEEP_ID", "sw"), ("WANDB_DIR", str(tmp_path)), ("WANDB_RUN_ID", "r")):
        monkeypatch.setenv(key, value)  # the agent sets some of them itself; monkeypatch puts them back
    monkeypatch.setenv("WANDB_SWEEP_PARAM_PATH", str(tmp_path / "params.yaml"))
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="sw")
    agent._sweep_command = copy.deepcopy(sweep["command"])
    agent._command_run({"type": "run", "run_id": "r", "program": sweep.get("program"), "args": args})
    return started[-1]


def dotted(namespace: Any, key: str) -> Any:
    for part in key.split("."):
        namespace = namespace[part]
    return namespace


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_sweep_file_passes_the_sweep_schema_and_runs_fit(path: Path) -> None:
    sweep = load(path)
    assert sweeps.schema_violations_from_proposed_config(sweep) == []
    command = sweep["command"]
    assert command[:3] == ["${env}", "fedmoe-pl", "fit"] and command[-1] == "${args}"  # ${args} after every --config
    assert sweep["metric"] == {"name": "best_mean_acc", "goal": "maximize"}
    for config in [command[i + 1] for i, token in enumerate(command) if token == "--config"]:
        assert (ROOT / config).is_file(), config


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_sweep_agent_argv_of_every_suggestion_is_accepted_by_fit(path: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(ROOT)  # the shipped sweeps name configs relative to the repository root
    sweep = load(path)
    parser = subcommand_parser(build_parser(), "fit")
    proposed = suggestions(sweep, limit=1000 if sweep["method"] == "grid" else LIMIT)
    if sweep["method"] == "grid":
        grid_size = 1
        for spec in sweep["parameters"].values():
            grid_size *= len(spec.get("values", [None]))
        assert len(proposed) == grid_size
    for suggestion in proposed:
        argv = agent_argv(sweep, suggestion, monkeypatch, tmp_path)
        assert argv[:2] == ["/usr/bin/env", "fedmoe-pl"]
        cfg = parser.parse_args(argv[3:])
        for name, entry in suggestion.items():
            if name == "config":  # a method overlay: its algorithm is the run's
                wanted = load(ROOT / entry["value"])["algorithm"]["class_path"]
                assert cfg.algorithm.class_path == wanted
            else:
                assert dotted(cfg, name) == entry["value"], (name, argv)


@pytest.mark.slow
def test_sweep_agent_loop_runs_two_real_runs_into_distinct_run_directories(monkeypatch, tmp_path: Path) -> None:
    """wandb's real agent loop (`wandb agent`), with only its three server calls replaced."""
    import wandb.apis.public.sweeps as server

    tiny = tiny_config(tmp_path)
    sweep = load(ROOT / "configs" / "sweeps" / "methods_grid.yaml")
    sweep["command"] = [str(tiny) if c == "configs/quickstart.yaml" else c for c in sweep["command"]]
    proposed = [
        {"config": {"value": str(ROOT / "configs/methods/pfedmoe.yaml")}, "seed_everything": {"value": 1}},
        {"config": {"value": str(ROOT / "configs/methods/standalone.yaml")}, "seed_everything": {"value": 2}},
    ]
    handed = iter([{"type": "run", "run_id": f"run{i}", "program": None, "args": a} for i, a in enumerate(proposed)])

    monkeypatch.setattr(server, "_sweep_with_runs", lambda *a, **k: {"config": yaml.safe_dump(sweep)})
    monkeypatch.setattr(server, "_register_agent", lambda *a, **k: {"id": "agent-0"})
    monkeypatch.setattr(server, "_agent_heartbeat", lambda *a, **k: [x for x in [next(handed, None)] if x])
    monkeypatch.setattr(wandb_agent.wandb, "Api", lambda *a, **k: object())
    monkeypatch.setattr(wandb_agent.Agent, "POLL_INTERVAL", 0.2)
    for key in ("WANDB_ENTITY", "WANDB_PROJECT", "WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):
        monkeypatch.setenv(key, "placeholder")  # the agent sets these; monkeypatch restores them
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)

    wandb_agent.run_agent("team/fedmoe-pl/sw1", count=2)

    runs = sorted((tmp_path / "runs" / "sweeps" / "sw1").iterdir())
    assert [r.name for r in runs] == ["run0", "run1"]
    for run, method in zip(runs, ("PFedMoE", "Standalone")):
        summary = json.loads((run / "summary.json").read_text())
        assert summary["status"] == "completed", run
        assert yaml.safe_load((run / "config.yaml").read_text())["algorithm"]["class_path"].endswith(method)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        best = 0.0
        for row in rows:  # the optimised metric is in the history of every evaluated round
            best = max(best, row["mean_acc"])
            assert row["best_mean_acc"] == best
        assert summary["best_mean_acc"] == best


@pytest.mark.slow
def test_a_stop_from_the_sweep_agent_ends_the_run_as_stopped_not_preempted(monkeypatch, tmp_path: Path) -> None:
    """wandb's real agent loop sends its SIGTERM (Hyperband early termination, a stop from the UI)."""
    import wandb.apis.public.sweeps as server

    tiny = tiny_config(tmp_path, rounds=400, run_dir=str(tmp_path / "runs" / "run"))
    sweep = load(ROOT / "configs" / "sweeps" / "methods_grid.yaml")
    sweep["command"] = [str(tiny) if c == "configs/quickstart.yaml" else c for c in sweep["command"]]
    run = tmp_path / "runs" / "sweeps" / "sw3" / "run0"
    commands = iter([[{"type": "run", "run_id": "run0", "program": None, "args": {"seed_everything": {"value": 1}}}]])

    def heartbeat(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        started = next(commands, None)
        if started is not None:
            return started
        metrics = run / "metrics.jsonl"
        if metrics.exists() and metrics.stat().st_size > 0:  # a round is done: the agent stops the run
            return [{"type": "stop", "run_id": "run0"}]
        return []

    monkeypatch.setattr(server, "_sweep_with_runs", lambda *a, **k: {"config": yaml.safe_dump(sweep)})
    monkeypatch.setattr(server, "_register_agent", lambda *a, **k: {"id": "agent-0"})
    monkeypatch.setattr(server, "_agent_heartbeat", heartbeat)
    monkeypatch.setattr(wandb_agent.wandb, "Api", lambda *a, **k: object())
    monkeypatch.setattr(wandb_agent.Agent, "POLL_INTERVAL", 0.2)
    for key in ("WANDB_ENTITY", "WANDB_PROJECT", "WANDB_SWEEP_ID", "WANDB_RUN_ID", "WANDB_SWEEP_PARAM_PATH"):
        monkeypatch.setenv(key, "placeholder")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    failures: list[int] = []
    original_poll = wandb_agent.AgentProcess.poll

    def poll(self: Any) -> Any:
        code = original_poll(self)
        if code is not None:
            failures.append(code)
        return code

    monkeypatch.setattr(wandb_agent.AgentProcess, "poll", poll)

    wandb_agent.run_agent("team/fedmoe-pl/sw3", count=1)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["reason"] == "SIGTERM"
    assert 0 < summary["rounds"] < 400
    assert failures == [0]  # the agent counts no failure, and nothing asks for the run to be handed out again


def test_only_a_preemption_marks_a_run_preempting(tmp_path: Path) -> None:
    from fedmoe_pl.run.sinks import Wandb

    class Tracker(RecordingTracker):
        def __init__(self) -> None:
            super().__init__()
            self.preempting, self.exit_codes = 0, []

        def summary(self, values: dict[str, Any]) -> None:
            pass

        def mark_preempting(self) -> None:
            self.preempting += 1

        def finish(self, exit_code: int = 0) -> None:
            self.exit_codes.append(exit_code)

    for status, preempting, code in (("stopped", 0, 0), ("interrupted", 1, 1), ("completed", 0, 0), ("failed", 0, 1)):
        tracker = Tracker()
        Wandb(tracker).on_run_end(None, {"status": status, "reason": None})  # type: ignore[arg-type]
        assert (tracker.preempting, tracker.exit_codes) == (preempting, [code]), status


def test_under_a_sweep_sigterm_is_final_and_sigusr1_a_preemption(monkeypatch) -> None:
    import signal

    from fedmoe_pl.errors import Interrupted
    from fedmoe_pl.run.experiment import stop_signals

    monkeypatch.setenv("WANDB_SWEEP_ID", "s")
    monkeypatch.setenv("WANDB_RUN_ID", "r")
    for signum, final in ((signal.SIGTERM, True), (signal.SIGINT, True), (signal.SIGUSR1, False)):
        signals = stop_signals()
        signals.signum = signum
        with pytest.raises(Interrupted) as stop:
            signals.check()
        assert stop.value.final is final
    monkeypatch.delenv("WANDB_SWEEP_ID")
    signals = stop_signals()
    signals.signum = signal.SIGTERM
    with pytest.raises(Interrupted) as stop:
        signals.check()
    assert stop.value.final is False  # outside a sweep, SIGTERM is a scheduler's: resumable


def test_sweep_run_directory_follows_the_run_id_and_resumes_when_handed_out_again(monkeypatch, tmp_path: Path) -> None:
    config = tiny_config(tmp_path)
    monkeypatch.setenv("WANDB_SWEEP_ID", "sw2")
    monkeypatch.setenv("WANDB_RUN_ID", "abc")
    main(["fit", "--config", str(config), "--federation.rounds=1"])
    run = tmp_path / "sweeps" / "sw2" / "abc"  # next to the config's run_dir (tmp_path/run)
    assert json.loads((run / "summary.json").read_text())["rounds"] == 1
    main(["fit", "--config", str(config), "--federation.rounds=2"])  # the same run id, e.g. after preemption
    monkeypatch.delenv("WANDB_SWEEP_ID")
    monkeypatch.delenv("WANDB_RUN_ID")
    main(["fit", "--config", str(config), "--federation.rounds=2", f"--federation.run_dir={tmp_path / 'ref'}"])
    assert_same_run(run, tmp_path / "ref")
    assert not (tmp_path / "run").exists()


def test_sweep_runs_report_online_unless_the_user_forces_another_mode() -> None:
    sweep = {"WANDB_SWEEP_ID": "s", "WANDB_RUN_ID": "r"}
    assert resolve_mode(None, sweep)[0] == "online"
    assert resolve_mode(None, {})[0] == "offline"
    assert resolve_mode("offline", sweep) == ("offline", "wandb.mode")
    assert resolve_mode(None, {**sweep, "WANDB_MODE": "disabled"}) == ("disabled", "WANDB_MODE")


def test_sweep_forced_offline_warns_that_the_sweep_gets_no_metrics(monkeypatch, tmp_path: Path, caplog) -> None:
    monkeypatch.setenv("WANDB_SWEEP_ID", "s")
    monkeypatch.setenv("WANDB_RUN_ID", "r")
    WandbTracker(WandbConfig(), tmp_path, {})  # WANDB_MODE=disabled, as in every test
    assert "the sweep receives no metrics" in caplog.text and "WANDB_MODE" in caplog.text


def test_sweep_metric_is_logged_to_wandb_history_every_evaluated_round(tmp_path: Path) -> None:
    from fedmoe_pl.cli import _experiment
    from fedmoe_pl.run.experiment import build_federation
    from fedmoe_pl.run.sinks import Wandb

    tracker = RecordingTracker()
    parser = subcommand_parser(build_parser(), "fit")
    exp = _experiment(parser, parser.parse_args(["--config", str(tiny_config(tmp_path, rounds=3, eval_every=1))]))
    exp.data.setup(exp.seed)
    build_federation(exp, [Wandb(tracker)]).run()
    assert [step for _, step, *_ in tracker.calls] == [1, 2, 3]
    running = 0.0
    for metrics, *_ in tracker.calls:
        running = max(running, metrics["mean_acc"])
        assert metrics["best_mean_acc"] == running
