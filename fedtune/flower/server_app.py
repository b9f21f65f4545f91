"""The fedtune ``ServerApp``: build the strategy named in the config and run the rounds.

Each round the global model is evaluated centrally on the held-out test split
(``evaluate_fn``); the end-of-round hook (:class:`~fedtune.flower.run_record.RunRecorder`)
then writes a row to ``metrics.csv`` (atomically), the server's state to the checkpoint
(atomically; :mod:`fedtune.results.checkpoint`) and one progress line to stdout.  At the
end the final adapter is saved in peft format and ``summary.json`` is written last.
``resume=True`` continues a run directory from its checkpoint.  Under ``tracking=`` the
run's tracker (:mod:`fedtune.tracking`) mirrors the config, every row and, at the end,
the plots and the adapter.

:func:`make_server_app` serves ``fedtune run`` (config in a closure); module-level
:data:`app` serves ``flwr run`` and deployment (config composed from the run config's
``overrides``).
"""

from __future__ import annotations

import contextlib
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedtune.comm.ledger import UP
from fedtune.config.composition import compose
from fedtune.config.run import RunConfig
from fedtune.evaluation import central_metrics
from fedtune.privacy.accounting import check_delta, not_accounted
from fedtune.privacy.client_level import summary_block, with_client_dp
from fedtune.registry import METHODS
from fedtune.flower.run_record import RunRecorder
from fedtune.privacy.histories import AccountantHistories, server_privacy_state
from fedtune.results.checkpoint import load_checkpoint, set_rng_state
from fedtune.results.store import RunStore, atomic_write_dir, read_metrics
from fedtune.runtime.environment import quiet_libraries
from fedtune.runtime.roster import SimulationRoster
from fedtune.runtime.workspace import Workspace
from fedtune.tracking import Tracker, open_tracker


def versions() -> dict[str, str]:
    import flwr
    import peft
    import torch
    import transformers

    import fedtune

    return {"fedtune": fedtune.__version__, "flwr": flwr.__version__, "torch": torch.__version__,
            "peft": peft.__version__, "transformers": transformers.__version__}


def failure_log(strategy: Any) -> list[dict[str, Any]]:
    """Every failed client of the run, with its reason (summary.json ``failures``)."""
    return [{"round": r, "client": pid, "reason": reason}
            for r, info in sorted(strategy.rounds.items()) for pid, reason in sorted(info.failures.items())]


def privacy_summary(cfg: RunConfig, strategy: Any, runner: Any = None) -> dict[str, Any]:
    """The ``privacy`` block of summary.json (none without DP): δ, the final ε, who ran out of budget
    (client-level DP: σ, C, which side clips, ε from the released rounds)."""
    if cfg.privacy.name == "none":
        return {}
    if cfg.privacy.name == "client_dp":
        return {"privacy": summary_block(cfg, runner)}
    spent = sorted({pid for info in strategy.rounds.values() for pid in info.budget_spent})
    eps = max(strategy.client_epsilon.values(), default=0.0)
    out = {"name": cfg.privacy.name, "delta": cfg.privacy.delta, "final_epsilon": eps,
           "target_epsilon": cfg.privacy.target_epsilon, "accountant": cfg.privacy.accountant,
           "clients_out_of_budget": spent,
           "replies_withheld_for_budget": sum(len(i.budget_spent) for i in strategy.rounds.values()),
           **not_accounted(cfg)}
    return {"privacy": out}


def resume_point(cfg: RunConfig, out_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The checkpoint of ``out_dir`` and its metrics rows up to the checkpointed round.

    Refuses a checkpoint of another experiment (any config field but ``num_rounds`` and
    ``faults.server_kill_round`` differs) and one that is truncated or was changed
    (:func:`~fedtune.results.checkpoint.load_checkpoint`).  Private runs resume too: the
    checkpoint holds the DP accountant histories or client-level DP's released rounds.
    """
    checkpoint = load_checkpoint(out_dir)
    saved, now = dict(checkpoint["config"]), cfg.to_dict()
    saved.setdefault("tracking", {"name": "none"})  # a checkpoint from before tracking= existed
    for d in (saved, now):
        d.pop("num_rounds", None)
        d["faults"] = {k: v for k, v in d["faults"].items() if k != "server_kill_round"}
    if saved != now:
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise ValueError(f"resume: {out_dir} was run with other settings ({', '.join(changed)} differ); "
                         "only num_rounds may change on resume")
    pc, saved_rounds = cfg.privacy, checkpoint["config"]["num_rounds"]
    if (pc.name == "dp_sgd" and pc.noise_multiplier is None and pc.planned_rounds is None
            and saved_rounds != cfg.num_rounds):
        raise ValueError(f"resume: {out_dir} calibrated its DP noise to num_rounds={saved_rounds} "
                         "(privacy.planned_rounds unset); resume it with that num_rounds")
    if cfg.train.lr_schedule != "constant" and saved_rounds != cfg.num_rounds:
        raise ValueError(f"resume: {out_dir} anneals its lr over num_rounds={saved_rounds} "
                         f"(train.lr_schedule={cfg.train.lr_schedule}); resume it with that num_rounds")
    if checkpoint["round"] > cfg.num_rounds:
        raise ValueError(f"resume: {out_dir} is checkpointed at round {checkpoint['round']}, "
                         f"past num_rounds={cfg.num_rounds}")
    rows = [r for r in read_metrics(out_dir) if int(r["round"]) <= checkpoint["round"]]
    return checkpoint, rows


def run_server(grid: Grid, cfg: RunConfig, out_dir: Path, resume: bool = False,
               roster: SimulationRoster | None = None, sweep: Path | None = None) -> dict[str, Any]:
    """Run ``cfg.num_rounds`` rounds on ``grid``; write the run directory; return the summary.

    ``resume``: continue ``out_dir`` from its checkpoint (rounds after it only).
    ``roster``: the simulation engine's node map (:mod:`fedtune.runtime.roster`), which
    replaces the roll-call; ``None`` in deployment.  ``sweep``: the Hydra multirun
    directory of this job (its tracked runs are grouped by it).
    """
    quiet_libraries(cfg.runtime.log_level)
    store = RunStore(out_dir)
    checkpoint = None
    if resume:
        checkpoint, store.rows = resume_point(cfg, out_dir)
    store.write_config(cfg.to_dict())
    summary: dict[str, Any] = {"status": "running", "strategy": cfg.strategy.name, "model": cfg.model.name,
                               "dataset": cfg.dataset.name, "seed": cfg.seed, "num_rounds": cfg.num_rounds,
                               "run_dir": str(out_dir), "versions": versions()}
    if checkpoint is not None:
        summary["resumed_from_round"] = checkpoint["round"]
    store.write_summary(summary)  # status "running" until the end: a killed run says so
    tracker = Tracker()
    try:
        tracker = open_tracker(cfg, out_dir, sweep, checkpoint["round"] if checkpoint is not None else None)
        tracker.log_config(cfg.to_dict())
        tracker.replay(store.rows)  # a resumed run: the kept rounds its tracked run lacks
        summary.update(_run_rounds(grid, cfg, store, checkpoint, roster, tracker))
        summary["status"] = "completed"
    except BaseException as exc:
        summary.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            tracker.close("failed")
        raise
    finally:
        store.write_summary(summary)
    tracker.log_artifacts(out_dir)  # summary.json is final: the tracker gets the finished directory
    tracker.close(summary["status"])
    return summary


def _run_rounds(grid: Grid, cfg: RunConfig, store: RunStore, checkpoint: dict[str, Any] | None,
                roster: SimulationRoster | None, tracker: Tracker) -> dict[str, Any]:
    workspace = Workspace(cfg)
    check_delta(cfg, [len(p) for p in workspace.partitions()])  # δ < 1/n, before any client runs
    model = workspace.model()
    test = workspace.encoded(cfg.eval.split)  # validation: a tuning study never scores on test
    strategy = METHODS.get(cfg.strategy.name).strategy_cls.from_config(cfg)
    strategy.roster = roster
    elapsed = float(store.rows[-1]["wall_seconds"]) if store.rows else 0.0  # a resumed run's clock goes on
    t_start = time.perf_counter() - elapsed
    resumed = f", resumed after round {checkpoint['round']}" if checkpoint else ""
    print(f"fedtune: {cfg.strategy.name} on {cfg.model.name}/{cfg.dataset.name}, "
          f"{cfg.federation.num_clients} clients ({cfg.federation.clients_per_round} per round), "
          f"{cfg.num_rounds} rounds, seed {cfg.seed}{resumed} -> {store.dir}", flush=True)

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Central evaluation of the global model on the test split (NaN when not due)."""
        strategy.load_into(model)
        due = server_round % cfg.eval.every == 0 or server_round == cfg.num_rounds
        started = time.perf_counter()
        values = (central_metrics(model, test, cfg.eval, workspace.device) if due else
                  {k: math.nan for k in ("eval-loss", "eval-accuracy", "heldout-loss", "heldout-accuracy")})
        return MetricRecord({**values, "eval-seconds": time.perf_counter() - started if due else 0.0})

    initial = ArrayRecord(workspace.initial_arrays())
    runner = with_client_dp(strategy, cfg)  # Flower's DP wrapper around it under privacy=client_dp
    privacy = server_privacy_state(cfg, runner)
    if checkpoint is not None:
        set_rng_state(checkpoint["rng"])
        if isinstance(privacy, AccountantHistories):
            privacy.load_state_dict(checkpoint["privacy"])  # (client-level DP's: in runner.start)
    recorder = RunRecorder(cfg, store, strategy, privacy, t_start, tracker)
    runner.start(grid=grid, initial_arrays=initial, num_rounds=cfg.num_rounds, evaluate_fn=evaluate_fn,
                 timeout=cfg.federation.round_timeout, resume=checkpoint, hooks=recorder)

    strategy.load_into(model)
    atomic_write_dir(store.dir / "adapter", lambda tmp: strategy.export(model, str(tmp)))
    store.write_ledger(strategy.ledger.rows())
    rows = store.rows
    accs = [float(r["eval_accuracy"]) for r in rows if not math.isnan(float(r["eval_accuracy"]))]
    return {
        "initial_accuracy": float(rows[0]["eval_accuracy"]), "final_accuracy": float(rows[-1]["eval_accuracy"]),
        "best_accuracy": max(accs), "final_eval_loss": float(rows[-1]["eval_loss"]),
        **({"final_rouge_l": float(rows[-1]["rouge_l"])} if rows[-1].get("rouge_l") else {}),
        "total_bytes": strategy.ledger.cumulative_bytes(cfg.num_rounds),
        "total_bytes_up": sum(int(r["bytes_up"]) for r in rows),
        "total_bytes_down": sum(int(r["bytes_down"]) for r in rows),
        "payload_up_per_client_round": strategy.ledger.payload_per_client_round(UP),
        "client_failures": sum(int(r["num_failures"]) for r in rows),
        "failures": failure_log(strategy),
        "wall_seconds": round(time.perf_counter() - t_start, 3),
        "resume_bytes": sum(r.wire_bytes for r in strategy.ledger.records if r.kind == "resume"),
        **privacy_summary(cfg, strategy, runner),
    }


def default_output_dir() -> Path:
    return Path("outputs") / "flwr" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def make_server_app(cfg: RunConfig | None = None, out_dir: str | Path | None = None,
                    resume: bool = False, roster: SimulationRoster | None = None,
                    sweep: Path | None = None) -> ServerApp:
    """A ServerApp for ``cfg`` (``None``: compose it from the run config's ``overrides``).

    ``resume`` (or the run config's ``resume = true`` under ``flwr run``): continue the
    output directory from its checkpoint.  ``roster``, ``sweep``: see :func:`run_server`.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else compose(str(context.run_config.get("overrides", "")))
        target = out_dir or context.run_config.get("output-dir") or default_output_dir()
        run_server(grid, run_cfg, Path(str(target)).resolve(), resume or bool(context.run_config.get("resume", False)),
                   roster, sweep)

    return app


app = make_server_app()
