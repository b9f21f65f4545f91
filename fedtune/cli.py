"""``fedtune``: run federations, plot results, list what is registered.

    fedtune run [HYDRA OVERRIDES...]     e.g. fedtune run model=tiny dataset=tiny num_rounds=3
    fedtune run -m seed=0,1,2            a Hydra multirun (one run directory per job)
    fedtune run --help                   every config group and option
    fedtune plot RUN_DIR [RUN_DIR ...]   accuracy vs cumulative bytes, accuracy vs round (PNG)
    fedtune list                         strategies, models and datasets
    fedtune deploy start|stop|certs ...  a local SuperLink + SuperNodes trial (see README "Run across machines")

Bad input (unknown names, out-of-range values, missing data) prints one line naming
the field and what is accepted, and exits with code 2 without leaving a run directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedtune.config import check_group_choices, compose
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
    import hydra
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from fedtune.config import CONFIG_DIR, from_dict
    from fedtune.hydra_errors import error_line

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base=None)
    def run(cfg: DictConfig) -> float:
        from hydra.core.hydra_config import HydraConfig

        from fedtune.runtime.environment import quiet_libraries

        out_dir = Path(HydraConfig.get().runtime.output_dir)
        quiet_libraries()
        try:
            run_cfg = from_dict(OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
            from fedtune.runtime.workspace import Workspace

            from fedtune.privacy.accounting import check_delta

            sizes = [len(p) for p in Workspace(run_cfg).partitions()]  # data present and partitionable
            check_delta(run_cfg, sizes)  # privacy.delta < 1/n: before Ray starts
        except (ConfigError, OmegaConfBaseException) as exc:  # OmegaConf: e.g. a bad ${interpolation}
            _remove_if_empty(out_dir)
            _fail(str(exc) if isinstance(exc, ConfigError) else error_line(exc, []))
        from fedtune.runtime.simulation import simulate

        summary = simulate(run_cfg, out_dir)
        print(f"fedtune: done in {summary['wall_seconds']:.0f}s; final accuracy {summary['final_accuracy']:.4f} "
              f"(round 0: {summary['initial_accuracy']:.4f}); {summary['total_bytes'] / 1e6:.2f} MB on the wire")
        print(f"fedtune: results in {out_dir} (metrics.csv, summary.json, adapter/); "
              f"plot with: fedtune plot {out_dir}")
        return float(summary["final_accuracy"])

    run()


def _plot(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="fedtune plot", description="Plot one or more fedtune run directories.")
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (with metrics.csv)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the PNGs (default: ./plots)")
    parser.add_argument("--title", default=None, help="figure title")
    args = parser.parse_args(argv)
    from fedtune.plots import plot_runs

    try:
        paths = plot_runs(args.run_dirs, args.out or Path("plots"), title=args.title)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    for p in paths:
        print(p)


def _list() -> None:
    from fedtune.registry import DATASETS, METHODS, MODELS

    print("strategies:", ", ".join(METHODS.names()))
    print("models:    ", ", ".join(MODELS.names()))
    print("datasets:  ", ", ".join(DATASETS.names()))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "run":
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
