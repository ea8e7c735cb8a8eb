"""The ``fedmoe-pl`` command, following LightningCLI's conventions.

Subcommands ``fit`` and ``partition`` take the same configuration: ``--config`` files (later ones
overlay earlier ones), dotted overrides such as ``--federation.rounds 50``, ``--print_config``,
``class_path``/``init_args`` for sources, partitioners and algorithms, and ``--seed_everything``.
``grid`` runs many such configurations (locally or as a Slurm job array), ``report`` tabulates
finished runs and ``plot`` draws one run's pictures.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser, Namespace

from fedmoe_pl.errors import Interrupted, RunError
from fedmoe_pl.run.trainer_settings import TrainerSettings

if TYPE_CHECKING:
    from fedmoe_pl.run.experiment import Experiment

# torch and Lightning are imported only by the commands that need them, so that `fedmoe-pl --help`
# and the tools over finished runs start at once.
EXPERIMENT_COMMANDS = ("fit", "partition")
DESCRIPTIONS = {
    "fit": "Train a federation and write its run directory",
    "partition": "Build the data partition of a config and report it, training nothing",
}

SHIPPED = Path(__file__).resolve().parent / "configs"  # the configs/ folder, installed with the package


def shipped(path: str) -> str:
    """``path`` if it is a file here, else the shipped config it names (``configs/quickstart.yaml`` or
    ``quickstart.yaml``), so that the documented commands work from an installed package too."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return path
    inside = Path(*given.parts[1:]) if given.parts[:1] == ("configs",) else given
    candidate = SHIPPED / inside
    return str(candidate) if inside.parts and candidate.is_file() else path


def with_shipped_configs(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config``/``-c`` value resolved by :func:`shipped`."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = shipped(out[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + shipped(arg.removeprefix("--config="))
    return out


DEFAULTS = {
    "data.source": {"class_path": "fedmoe_pl.data.FashionMNIST"},
    "data.partitioner": {"class_path": "fedmoe_pl.data.Pathological", "init_args": {"classes_per_client": 2}},
    "algorithm": {"class_path": "fedmoe_pl.algorithms.PFedMoE"},
}


def _experiment_parser(description: str) -> ArgumentParser:
    from lightning.pytorch.loggers import Logger

    from fedmoe_pl.algorithms import Algorithm, ClientConfig
    from fedmoe_pl.analysis.results import CostConfig
    from fedmoe_pl.data import FederatedDataModule
    from fedmoe_pl.run.federation import FederationConfig
    from fedmoe_pl.run.tracking import WandbConfig

    # No abbreviations: `--federation.round 1` must not run as `--federation.rounds 1`.
    parser = ArgumentParser(description=description, exit_on_error=False, allow_abbrev=False)
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="YAML config; repeat to overlay")
    parser.add_argument("--seed_everything", type=int, default=0, help="seed of every random stream of the run")
    parser.add_class_arguments(FederatedDataModule, "data")
    parser.add_class_arguments(ClientConfig, "client")
    parser.add_subclass_arguments(Algorithm, "algorithm")
    parser.add_class_arguments(FederationConfig, "federation")
    parser.add_class_arguments(WandbConfig, "wandb")
    parser.add_class_arguments(CostConfig, "cost")
    parser.add_argument(
        "--loggers",
        type=list[Logger] | None,
        default=None,
        help="Lightning loggers besides W&B (class_path/init_args each), logging every round at step = round",
    )
    # Only the Trainer arguments a local fit honours; the federation owns the others.
    parser.add_class_arguments(TrainerSettings, "trainer")
    parser.set_defaults(DEFAULTS)
    return parser


def build_parser(experiments: bool = True) -> ArgumentParser:
    """The ``fedmoe-pl`` parser; ``experiments=False`` gives ``fit`` and ``partition`` placeholder
    parsers (for a command line that uses neither), which import no torch."""
    parser = ArgumentParser(
        prog="fedmoe-pl",
        description="pFedMoE and baselines for personalized federated learning",
        allow_abbrev=False,
        exit_on_error=False,
    )
    commands = parser.add_subcommands(dest="subcommand")
    experiment = _experiment_parser if experiments else _placeholder_parser
    fit_parser = experiment(DESCRIPTIONS["fit"])
    fit_parser.add_argument("--resume", type=str | None, default=None, help="run directory or checkpoint to continue")
    commands.add_subcommand("fit", fit_parser, help="train a federation")
    part_parser = experiment(DESCRIPTIONS["partition"])
    part_parser.add_argument(
        "--output", type=str, default="partition", help="folder for partition.json and the heat map"
    )
    commands.add_subcommand("partition", part_parser, help="inspect the partition a config produces")
    commands.add_subcommand("grid", _grid_parser(), help="run a grid of experiments, locally or as a Slurm job array")
    commands.add_subcommand("report", _report_parser(), help="tables and plots over finished run directories")
    plot_parser = ArgumentParser(description="Draw a run's pictures (also for an interrupted run)", allow_abbrev=False)
    plot_parser.add_argument("run_dir", type=str, help="run directory")
    plot_parser.add_argument("--output", type=str | None, default=None, help="folder for the PNGs (the run directory)")
    commands.add_subcommand("plot", plot_parser, help="draw a run's pictures")
    return parser


def _placeholder_parser(description: str) -> ArgumentParser:
    return ArgumentParser(description=description, exit_on_error=False, allow_abbrev=False)


def _grid_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Expand a grid file into cells and run them", allow_abbrev=False)
    parser.add_argument("grid_file", type=str, help="grid YAML (see configs/grids/)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="list the cells only")
    parser.add_argument("--launcher", type=Literal["local", "slurm"], default="local", help="where cells run")
    parser.add_argument("--output", type=str | None, default=None, help="folder of the runs (the grid's output)")
    parser.add_argument(
        "--only",
        type=str,
        nargs="*",
        default=[],
        metavar="AXIS=VALUE",
        help="run only the cells with these values (AXIS=V1,V2 for several, seed=0 for seeds), e.g. --only hidden=h64",
    )
    # Every Slurm option of a grid file's ``slurm:`` section is also a flag, named and typed as there.
    import typing
    from dataclasses import fields

    from fedmoe_pl.cluster.grid import SlurmOptions, option_help

    kinds, helps = typing.get_type_hints(SlurmOptions), option_help(SlurmOptions)
    for option in fields(SlurmOptions):
        kind = kinds[option.name]
        parser.add_argument(
            f"--{option.name}",
            type=kind if type(None) in typing.get_args(kind) else kind | None,
            default=None,
            help=f"{helps.get(option.name, option.name)} (overrides the grid file's slurm: section)",
        )
    return parser


def _report_parser() -> ArgumentParser:
    parser = ArgumentParser(description="Methods x settings table and accuracy plots over runs", allow_abbrev=False)
    parser.add_argument("run_dirs", type=str, nargs="+", help="run directories, or grid outputs holding them")
    parser.add_argument("--output", type=str, default="report", help="folder for report.md, report.csv and plots")
    parser.add_argument("--target", type=float, default=0.9, help="accuracy for the rounds-to-target column")
    parser.add_argument(
        "--link-mbps",
        type=float,
        nargs="*",
        default=[],
        help="client link rates (Mbit/s, up = down): add seconds per round and to the target over each",
    )
    parser.add_argument(
        "--compute-flops", type=float, default=None, help="a client's training speed (FLOP/s) for those seconds"
    )
    parser.add_argument(
        "--pivot",
        type=str,
        nargs=2,
        default=None,
        metavar=("ROWS", "COLUMNS"),
        help="two grid axes: final accuracy as a ROWS x COLUMNS table and bar chart (an ablation)",
    )
    return parser


def _grid(cfg: Namespace) -> int:
    from fedmoe_pl.cluster.grid import Grid, deduplicate, describe, run_local, select
    from fedmoe_pl.run.rundir import make_folder

    grid = Grid.load(cfg.grid_file)
    if cfg.output:
        grid.output = cfg.output
    make_folder(grid.output, "grid --output", create=False)
    cells, left_out = deduplicate(select(grid.cells(), cfg.only) if cfg.only else grid.cells())
    if left_out:
        same = "; ".join(f"{a.name} = {b.name}" for a, b in left_out)
        print(
            f"fedmoe-pl grid: {len(left_out)} cells resolve to the same run config as a later cell and are left out "
            f"(left out = kept): {same}",
            file=sys.stderr,
        )
    if cfg.launcher == "local":
        if cfg.dry_run:
            print(describe(cells))
            return 0
        return run_local(cells)
    from dataclasses import fields

    from fedmoe_pl.cluster.slurm import submit

    for option in fields(grid.slurm):
        if cfg[option.name] is not None:
            setattr(grid.slurm, option.name, cfg[option.name])
    if cfg.dry_run:
        print(describe(cells))
    submit(grid, cells, grid.slurm, dry_run=cfg.dry_run)
    return 0


def _experiment(parser: ArgumentParser, cfg: Namespace) -> Experiment:
    from fedmoe_pl.run.experiment import Experiment

    if not 0 <= cfg.seed_everything < 2**32:
        raise ValueError(f"seed_everything must be an integer in [0, 2**32), got {cfg.seed_everything}")
    try:
        init = parser.instantiate(cfg)
    except (ValueError, TypeError) as err:  # a class refused its arguments; jsonargparse nests the reason
        raise ValueError(one_line(str(err))) from err
    plain = cfg.clone()
    for key in ("config", "__path__"):
        if key in plain:
            del plain[key]
    as_dict: dict[str, Any] = plain.as_dict()
    return Experiment(
        seed=cfg.seed_everything,
        data=init.data,
        client=init.client,
        algorithm=init.algorithm,
        federation=init.federation,
        wandb=init.wandb,
        trainer=init.trainer.changed(),
        cost=init.cost,
        loggers=list(init.loggers or []),
        config=as_dict,
        config_yaml=parser.dump(plain, skip_unset=False),
    )


def experiment_from_args(argv: list[str]) -> Experiment:
    """The experiment ``fedmoe-pl fit ARGV`` would run (without ``--resume``), for other runners such
    as the Flower apps, which take the same arguments."""
    parser = _experiment_parser("A federation's configuration")
    return _experiment(parser, parser.parse_args(with_shipped_configs(argv)))


# Lines of jsonargparse's nested errors that repeat what the others say, or show its internals.
_NOISE = (
    "Given value",
    "Subtypes:",
    "Errors:",
    "Does not validate against any of the Union subtypes",
    "Expected a <class 'NoneType'>",
)


def one_line(message: str) -> str:
    """A parser error as one line: the keys on the way to the offending value, the value and what was expected."""
    parts = [line.strip().removeprefix("- ") for line in message.splitlines()]
    kept = [part for part in parts if part and not part.startswith(_NOISE)]
    return " ".join(kept).rstrip(".")


def _given(message: str, args: list[str]) -> str:
    """`` (got VALUE)`` when the parser's message names a key but not the value given for it."""
    if "Got value" in message or not (found := re.search(r'Parser key "([^"]+)"', message)):
        return ""
    flag = f"--{found.group(1)}"
    for i, arg in enumerate(args):
        if arg.startswith(flag + "="):
            return f" (got {arg.split('=', 1)[1]!r})"
        if arg == flag and i + 1 < len(args):
            return f" (got {args[i + 1]!r})"
    return ""


def parser_commands(parser: ArgumentParser) -> list[str]:
    return list(parser._subcommands_action._name_parser_map)  # type: ignore[union-attr]


def subcommand_parser(parser: ArgumentParser, name: str) -> ArgumentParser:
    """The parser of one subcommand (jsonargparse keeps them in its subcommands action)."""
    return parser._subcommands_action._name_parser_map[name]  # type: ignore[union-attr]


def main(argv: list[str] | None = None) -> None:
    args = with_shipped_configs(sys.argv[1:] if argv is None else list(argv))
    if len(args) > 1 and args[0] == "grid" and not args[1].startswith("-"):
        args[1] = shipped(args[1])
    parser = build_parser(experiments=bool(args) and args[0] in EXPERIMENT_COMMANDS)
    try:
        cfg = parser.parse_args(args)
    except ArgumentError as err:
        command = args[0] if args and args[0] in parser_commands(parser) else None
        where = f"fedmoe-pl {command}" if command else "fedmoe-pl"
        print(f"{where}: error: {one_line(str(err))}{_given(str(err), args)}. See: {where} --help", file=sys.stderr)
        raise SystemExit(2) from None
    command = cfg.subcommand
    sub_parser = subcommand_parser(parser, command)
    sub_cfg = cfg[command]
    if command in ("grid", "report", "plot"):
        code = _tool_command(command, sub_cfg)
        if code:
            raise SystemExit(code)
        return
    from fedmoe_pl.fleets.distributed import is_leader
    from fedmoe_pl.fleets.executor import quiet_lightning
    from fedmoe_pl.run.experiment import fit

    quiet_lightning()
    try:
        if command == "fit":
            _sweep_run_dir(sub_cfg)
        if command == "fit" and sub_cfg.resume:
            _resume_in_place(sub_cfg)
        exp = _experiment(sub_parser, sub_cfg)
        if command == "fit":
            summary = fit(exp, resume=sub_cfg.resume)
            if not is_leader():  # rank 0 of a multi-process run speaks for it
                return
            print(
                f"final mean client test accuracy: {_accuracy(summary['final_mean_acc'])} "
                f"(best {_accuracy(summary['best_mean_acc'])} at round {summary['best_round']})\n"
                f"results: {Path(exp.federation.run_dir).resolve()}"
            )
        else:
            from fedmoe_pl.analysis.report import write_partition

            write_partition(exp, Path(sub_cfg.output))
    except Interrupted as stop:
        run_dir = Path(sub_cfg.federation.run_dir)
        if stop.final:  # the W&B sweep agent ended it: exit 0, so the agent counts no failure
            print(
                f"fedmoe-pl {command}: stopped by the W&B sweep agent ({stop.name}) after round {stop.round}; "
                f"the run ends here (status: stopped in {run_dir / 'summary.json'})",
                file=sys.stderr,
            )
            return
        print(
            f"fedmoe-pl {command}: interrupted by {stop.name} after round {stop.round}; the run directory keeps "
            f"that round's checkpoint. Continue with: fedmoe-pl fit --config {run_dir / 'config.yaml'} "
            f"--resume {run_dir}",
            file=sys.stderr,
        )
        raise SystemExit(stop.exit_code) from None
    except RunError as err:
        print(f"fedmoe-pl {command}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except (ValueError, FileNotFoundError, TypeError) as err:
        print(f"fedmoe-pl {command}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _tool_command(command: str, cfg: Namespace) -> int:
    """``grid``, ``report`` and ``plot``: commands over finished runs, each failing with one line."""
    try:
        if command == "grid":
            return _grid(cfg)
        if command == "plot":
            from fedmoe_pl.analysis.plots import plot_run

            written = plot_run(Path(cfg.run_dir), Path(cfg.output) if cfg.output else None)
            print("written: " + ", ".join(str(p) for p in written))
            return 0
        from fedmoe_pl.analysis.results import Link, write_report

        links = [Link(rate, rate, cfg.compute_flops) for rate in cfg.link_mbps]
        pivot = tuple(cfg.pivot) if cfg.pivot else None
        write_report([Path(p) for p in cfg.run_dirs], Path(cfg.output), cfg.target, links, pivot)  # type: ignore[arg-type]
        return 0
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"fedmoe-pl {command}: error: {err}", file=sys.stderr)
        return 2


def _sweep_run_dir(cfg: Namespace) -> None:
    """Under a W&B sweep agent: the run directory derives from the sweep run's id; resume it if it holds a run."""
    from fedmoe_pl.cluster.sweep import SweepRun
    from fedmoe_pl.run.rundir import RunDirectory

    sweep = SweepRun.from_env()
    if sweep is None or cfg.resume:
        return
    run_dir = sweep.run_dir(cfg.federation.run_dir)
    cfg.federation.run_dir = str(run_dir)
    if RunDirectory(run_dir).holds_run():
        cfg.resume = str(run_dir)
        print(f"fedmoe-pl fit: W&B sweep run {sweep.run_id} was started before; resuming {run_dir}", file=sys.stderr)
    else:
        print(
            f"fedmoe-pl fit: W&B sweep {sweep.sweep_id}, run {sweep.run_id}: run directory {run_dir}", file=sys.stderr
        )


def _resume_in_place(cfg: Namespace) -> None:
    """``--resume A`` continues the run in A, whatever directory the config names."""
    from fedmoe_pl.run.rundir import RunDirectory

    run_dir = RunDirectory.locate(cfg.resume)
    if Path(cfg.federation.run_dir).resolve() != run_dir.resolve():
        print(
            f"fedmoe-pl fit: resuming the run in {run_dir} (not the config's {cfg.federation.run_dir})", file=sys.stderr
        )
    cfg.federation.run_dir = str(run_dir)


def _accuracy(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    main()
