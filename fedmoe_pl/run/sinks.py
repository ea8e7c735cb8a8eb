"""Where a run's events go: the metrics file, the checkpoint, the summary, W&B, the progress bar.

Sinks work as Lightning callbacks do: the loop calls every sink's hook at the same point, in the
order given, and knows nothing about files or services. Each hook is optional.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from fedmoe_pl.errors import RunError
from fedmoe_pl.run.rundir import SUMMARY, RunDirectory
from fedmoe_pl.run.tracking import WandbTracker, round_scalars

if TYPE_CHECKING:
    from fedmoe_pl.analysis.results import CostConfig
    from fedmoe_pl.run.federation import Federation

log = logging.getLogger(__name__)


class Sink:
    """Receives the run's events; override the hooks you need."""

    def on_run_start(self, fed: Federation) -> None:
        """Before the first round to train (after a resume: after the checkpoint's round)."""

    def on_round_end(self, fed: Federation, record: dict[str, Any]) -> None:
        """After each round, with the round's metrics record."""

    def on_run_end(self, fed: Federation, summary: dict[str, Any]) -> None:
        """When the run ends, completed or not (``summary["status"]``). Must not raise."""


class MetricsFile(Sink):
    """``metrics.jsonl``: one strict-JSON line per evaluated round."""

    def __init__(self, run_dir: RunDirectory) -> None:
        self.run_dir = run_dir

    def on_run_start(self, fed: Federation) -> None:
        self.run_dir.truncate_metrics(fed.round)  # lines written after the last checkpoint are redone

    def on_round_end(self, fed: Federation, record: dict[str, Any]) -> None:
        if "mean_acc" in record:
            self.run_dir.append_metrics(record)


class Checkpoint(Sink):
    """``last.ckpt``: the whole federation, before round 1 and after every round (nothing when the
    fleet's clients keep their state themselves: ``fleet.resumable`` False, as on Flower's nodes).

    Args:
        run_dir: where to write.
        meta: stored with every checkpoint (what a resumption must agree with).
    """

    def __init__(self, run_dir: RunDirectory, meta: dict[str, Any]) -> None:
        self.run_dir, self.meta = run_dir, meta

    def on_run_start(self, fed: Federation) -> None:
        if fed.round == 0:  # from now on the run can always be resumed
            self.on_round_end(fed, {})

    def on_round_end(self, fed: Federation, record: dict[str, Any]) -> None:
        if not fed.fleet.resumable:
            return
        self.run_dir.save_checkpoint({**fed.state_dict(), "meta": self.meta})
        fed.fleet.checkpoint_saved()


class SummaryFile(Sink):
    """``summary.json``, written however the run ends; with ``cost``, its ``time`` section too."""

    def __init__(self, run_dir: RunDirectory, cost: CostConfig | None = None) -> None:
        self.run_dir, self.cost = run_dir, cost

    def on_run_end(self, fed: Federation, summary: dict[str, Any]) -> None:
        if self.cost is not None:
            try:
                summary = {**summary, "time": self.cost.section(summary, list(self.run_dir.read_metrics()))}
            except Exception as err:  # must not hide why the run ended, nor cost the summary
                log.error("the summary's time section could not be computed: %s", err)
        try:
            self.run_dir.write_json(SUMMARY, summary)
        except RunError as err:  # must not hide why the run ended
            log.error("%s", err)


class Wandb(Sink):
    """The W&B run: the partition table once, every round's record, the summary.

    Args:
        tracker: the W&B run.
        partition: ``(columns, rows)`` of per-client label counts, logged at a fresh start.
    """

    def __init__(self, tracker: WandbTracker, partition: tuple[list[Any], list[list[Any]]] | None = None) -> None:
        self.tracker, self.partition = tracker, partition

    def on_run_start(self, fed: Federation) -> None:
        if fed.round == 0 and self.partition is not None:
            self.tracker.log({}, step=0, tables={"partition": self.partition})

    def on_round_end(self, fed: Federation, record: dict[str, Any]) -> None:
        self.tracker.log_round(record, fed.fleet.model_names)

    def on_run_end(self, fed: Federation, summary: dict[str, Any]) -> None:
        try:
            self.tracker.summary({k: v for k, v in summary.items() if k != "clients"})
            if summary["status"] == "interrupted":
                self.tracker.mark_preempting()  # resumable: a sweep hands the run out again
            # A run its sweep agent stopped (early termination) ends normally: not preempted, not failed.
            self.tracker.finish(exit_code=0 if summary["status"] in ("completed", "stopped") else 1)
        except Exception as err:
            log.error("W&B could not finish the run: %s", err)


LOGGER_STATUS = {"completed": "success", "stopped": "success", "interrupted": "finished"}  # else "failed"


class LightningLoggers(Sink):
    """Any Lightning ``Logger`` (CSV, TensorBoard, MLflow, ...): the config as hyper-parameters at a
    fresh start, every round's scalars at ``step = round`` as the W&B sink logs them (per-client values
    as ``key/client``), and the run's status when it ends.

    Args:
        loggers: the ``loggers`` of the config, instantiated.
        config: the resolved config, logged as hyper-parameters.
    """

    def __init__(self, loggers: list[Any], config: dict[str, Any]) -> None:
        self.loggers, self.config = loggers, config

    def on_run_start(self, fed: Federation) -> None:
        if fed.round == 0:
            for logger in self.loggers:
                logger.log_hyperparams(self.config)

    def on_round_end(self, fed: Federation, record: dict[str, Any]) -> None:
        scalars = {k: float(v) for k, v in round_scalars(record).items() if v is not None}
        for logger in self.loggers:
            logger.log_metrics(scalars, step=record["round"])
            logger.save()

    def on_run_end(self, fed: Federation, summary: dict[str, Any]) -> None:
        for logger in self.loggers:
            try:
                logger.finalize(LOGGER_STATUS.get(summary["status"], "failed"))
            except Exception as err:  # must not hide why the run ended
                log.error("logger %s could not finish: %s", type(logger).__name__, err)


class ProgressBar(Sink):
    """A bar over rounds with the last mean accuracy."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_run_start(self, fed: Federation) -> None:
        self.bar = tqdm(total=fed.cfg.rounds, initial=fed.round, desc="rounds", unit="round", dynamic_ncols=True)

    def on_round_end(self, fed: Federation, record: dict[str, Any]) -> None:
        if record.get("mean_acc") is not None:
            self.bar.set_postfix(mean_acc=f"{record['mean_acc']:.4f}")
        self.bar.update(1)

    def on_run_end(self, fed: Federation, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()


class Plots(Sink):
    """The run's pictures (:mod:`fedmoe_pl.analysis.plots`), drawn into the run directory however the run ends."""

    def __init__(self, run_dir: RunDirectory) -> None:
        self.run_dir = run_dir

    def on_run_end(self, fed: Federation, summary: dict[str, Any]) -> None:
        from fedmoe_pl.analysis.plots import plot_run

        if fed.round == 0:
            return  # no round, nothing to draw
        try:
            plot_run(self.run_dir.path)
        except Exception as err:  # a picture must never hide how the run ended
            log.error("could not draw the run's pictures: %s (retry with: fedmoe-pl plot %s)", err, self.run_dir.path)
