"""``fedtune``: run federations, plot results, list what is registered.

    fedtune run [HYDRA OVERRIDES...]     e.g. fedtune run model=tiny dataset=tiny num_rounds=3
    fedtune run -m seed=0,1,2            a Hydra multirun (one run directory per job)
    fedtune run resume=RUN_DIR [num_rounds=N]   continue a killed run from its checkpoint
    fedtune run --help                   every config group and option
    fedtune plot RUN_DIR [RUN_DIR ...]   accuracy vs cumulative bytes, accuracy vs round (PNG)
    fedtune run tracking=tensorboard|mlflow    also mirror the run into TensorBoard / MLflow (README "Watch a run")
    fedtune plot --metric rouge_l RUN_DIR   another metrics.csv column (rouge_l, exact_match, ...)
    fedtune list                         strategies, models, datasets, privacy and tracking options
    fedtune deploy start|stop|certs ...  a local SuperLink + SuperNodes trial (see README "Run across machines")

Bad input (unknown names, out-of-range values, missing data) prints one line naming
the field and what is accepted, and exits with code 2 without leaving a run directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedtune.config.composition import check_group_choices, compose
from fedtune.errors import ConfigError

USAGE = __doc__


def _fail(message: str) -> None:
    print(f"fedtune: error: {message}", file=sys.stderr)
    sys.exit(2)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _hydra_entry() -> None:
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from fedtune.config.composition import error_line, hydra_main
    from fedtune.config.run import from_dict

    @hydra_main
    def run(cfg: DictConfig) -> float:
        from hydra.core.hydra_config import HydraConfig

        from fedtune.runtime.environment import quiet_libraries

        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        out_dir = Path(hydra_cfg.runtime.output_dir)
        sweep = Path(hydra_cfg.sweep.dir) if hydra_cfg.mode == RunMode.MULTIRUN else None  # groups tracked runs
        quiet_libraries()
        from fedtune.runtime.simulation import simulate

        try:
            run_cfg = from_dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
            summary = simulate(run_cfg, out_dir, sweep=sweep)  # its checks before Ray raise ConfigError
        except (ConfigError, OmegaConfBaseException) as exc:  # OmegaConf: e.g. a bad ${interpolation}
            _remove_if_empty(out_dir)
            _fail(str(exc) if isinstance(exc, ConfigError) else error_line(exc, []))
        _report(summary, out_dir)
        return float(summary["final_accuracy"])

    run()


def _report(summary: dict, out_dir: Path) -> None:  # type: ignore[type-arg]
    print(f"fedtune: done in {summary['wall_seconds']:.0f}s; final accuracy {summary['final_accuracy']:.4f} "
          f"(round 0: {summary['initial_accuracy']:.4f}); {summary['total_bytes'] / 1e6:.2f} MB on the wire")
    print(f"fedtune: results in {out_dir} (metrics.csv, summary.json, adapter/); "
          f"plot with: fedtune plot {out_dir}")


def _resume(args: list[str]) -> None:
    """``fedtune run resume=RUN_DIR [num_rounds=N]``: the run's own config.yaml, its checkpoint."""
    from omegaconf import OmegaConf

    from fedtune.config.run import from_dict
    from fedtune.flower.server_app import resume_point

    run_dir = Path(next(a for a in args if a.startswith("resume=")).partition("=")[2]).expanduser().resolve()
    extra = [a for a in args if not a.startswith("resume=")]
    if any(not a.startswith("num_rounds=") for a in extra):
        _fail(f"resume: only num_rounds=N may be given with resume=RUN_DIR (the run's config.yaml "
              f"is used), got {' '.join(a for a in extra if not a.startswith('num_rounds='))}")
    if not (run_dir / "config.yaml").is_file():
        _fail(f"resume: {run_dir} has no config.yaml (not a fedtune run directory)")
    data = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True)
    for a in extra:
        try:
            data["num_rounds"] = int(a.partition("=")[2])  # type: ignore[index]
        except ValueError:
            _fail(f"num_rounds must be an integer >= 1, got {a.partition('=')[2]!r}")
    try:
        cfg = from_dict(data)  # type: ignore[arg-type]
        resume_point(cfg, run_dir)  # refuse before Ray starts
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    from fedtune.runtime.environment import quiet_libraries
    from fedtune.runtime.simulation import simulate

    quiet_libraries()
    try:
        summary = simulate(cfg, run_dir, resume=True)  # its checks before Ray raise ConfigError
    except ConfigError as exc:
        _fail(str(exc))
    _report(summary, run_dir)


def _plot(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="fedtune plot", description="Plot one or more fedtune run directories.")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (with metrics.csv)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default: ./plots)")
    parser.add_argument("--title", default=None, help="figure title")
    parser.add_argument("--metric", default="eval_accuracy",
                        help="metrics.csv column on the y axis (default eval_accuracy; e.g. rouge_l, exact_match)")
    args = parser.parse_args(argv)
    from fedtune.plots import plot_runs

    try:
        paths = plot_runs(args.run_dirs, args.out or Path("plots"), title=args.title, metric=args.metric)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    for p in paths:
        print(p)


def _list() -> None:
    from fedtune.registry import DATASETS, METHODS, MODELS, PRIVACY, TRACKING

    print("strategies:", ", ".join(METHODS.names()))
    print("models:    ", ", ".join(MODELS.names()))
    print("datasets:  ", ", ".join(DATASETS.names()))
    print("privacy:   ", ", ".join(PRIVACY.names()))
    print("tracking:  ", ", ".join(TRACKING.names()))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "run" and any(arg.startswith("resume=") for arg in rest):
        _resume(rest)
    elif command == "run":
        try:
            check_group_choices(rest)
            if not any(arg.startswith("-") for arg in rest):  # one run (not -m, --help, ...): validate it now,
                # since @hydra.main reports a bad override over many lines with exit code 1
                compose([arg for arg in rest if not arg.lstrip("+~").startswith("hydra")])
        except ConfigError as exc:
            _fail(str(exc))
        sys.argv = ["fedtune run", *rest]
        _hydra_entry()
    elif command == "plot":
        _plot(rest)
    elif command == "list":
        _list()
    elif command == "deploy":
        from fedtune.runtime.deploy_cli import main as deploy_main

        try:
            deploy_main(rest)
        except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as exc:
            _fail(str(exc))
    else:
        _fail(f"unknown command {command!r}; accepted: run, plot, list, deploy (see fedtune --help)")


if __name__ == "__main__":
    main()
