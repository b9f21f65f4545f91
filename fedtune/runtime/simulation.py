"""Run a federation on Flower's simulation engine with the Ray backend.

Ray is capped to this machine (``runtime.ray_num_cpus``, an object store of
``runtime.ray_object_store_mb``) or attached to an existing cluster
(``runtime.ray_address``), and is always shut down afterwards, even on failure; on an
attached cluster ``runtime.warm_actors`` leaves the client actors running for the next
run, which then skips their start-up (a process importing torch, transformers and peft).
When a GPU is present, clients train on it and share it through ``num_gpus``
fractions (``runtime.client_num_gpus``; default: split evenly among actors).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune.config.run import RunConfig
from fedtune.results.store import atomic_write_text
from fedtune.runtime.environment import quiet_libraries
from fedtune.runtime.flower_private import (drop_run_simulation_deprecation, end_warm_actors, quiet_actor_shutdown,
                                              warm_actors)
from fedtune.runtime.message_pump import fast_message_pump
from fedtune.runtime.roster import capture_roster


ACTOR_MAX_RESTARTS = -1  # Ray: restart a client actor whose process died, without limit
ACTOR_MAX_TASK_RETRIES = 3  # Ray: calls retried after their actor died (a deterministic crash: 3 more tries)


def client_num_gpus(cfg: RunConfig) -> float:
    if cfg.runtime.client_num_gpus is not None:
        return float(cfg.runtime.client_num_gpus)
    import torch

    if cfg.runtime.device == "cpu" or not torch.cuda.is_available():
        return 0.0
    actors = max(1, int((cfg.runtime.ray_num_cpus or 1) // cfg.runtime.client_num_cpus))
    return round(1.0 / actors, 4)


def backend_config(cfg: RunConfig) -> dict[str, Any]:
    rt = cfg.runtime
    if rt.ray_address:
        init_args: dict[str, Any] = {"address": rt.ray_address}
    else:
        init_args = {"num_cpus": rt.ray_num_cpus, "object_store_memory": rt.ray_object_store_mb * 2**20,
                     "include_dashboard": False, "log_to_driver": True}
        if rt.ray_num_cpus is None:
            del init_args["num_cpus"]
    # Flower passes client_resources to ActorClass.options().  Its pool keeps a dead actor
    # (a client process that crashed, or a faults `exit`) and would fail every later message
    # sent to it: Ray restarts the actor instead, and retries the calls queued on it, which
    # would otherwise fail at once while it restarts (fedtune/flower/faults.py).
    return {"client_resources": {"num_cpus": rt.client_num_cpus, "num_gpus": client_num_gpus(cfg),
                                 "max_restarts": ACTOR_MAX_RESTARTS, "max_task_retries": ACTOR_MAX_TASK_RETRIES},
            "init_args": init_args}


def attach_cluster(cfg: RunConfig) -> dict[str, Any]:
    """Connect to the Ray cluster at ``runtime.ray_address`` and check what it offers.

    Flower sizes its actor pool from ``ray.cluster_resources()`` once Ray is up, so
    connecting first (Flower then reuses the connection) lets us report, and check,
    that the simulation sees every node's CPUs/GPUs rather than a local Ray.
    """
    import ray

    ray.init(address=cfg.runtime.ray_address, log_to_driver=True)
    if not cfg.runtime.warm_actors:  # idle warm actors would hold the CPUs Flower sizes this run's pool from
        end_warm_actors()
    resources = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    cpus, gpus = float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0))
    if cpus < cfg.runtime.client_num_cpus:
        raise RuntimeError(f"runtime.ray_address: the cluster at {cfg.runtime.ray_address} offers {cpus:g} CPUs, "
                           f"fewer than runtime.client_num_cpus={cfg.runtime.client_num_cpus:g}")
    info = {"address": cfg.runtime.ray_address, "nodes": len(alive), "cpus": cpus, "gpus": gpus,
            "client_actors": int(cpus // cfg.runtime.client_num_cpus)}
    print(f"fedtune: Ray cluster at {info['address']}: {info['nodes']} nodes, {cpus:g} CPUs, {gpus:g} GPUs "
          f"-> up to {info['client_actors']} concurrent clients", flush=True)
    return info


def check_before_ray(cfg: RunConfig) -> None:
    """Everything knowable before Ray starts, so bad input is one ConfigError line and no run:
    the tracking backend installed, the data present and partitionable (cached for the
    server), the privacy budget's delta against the partition sizes, and the model
    (:func:`fedtune.models.preflight.preflight`)."""
    from fedtune.models.preflight import preflight
    from fedtune.privacy.accounting import check_delta
    from fedtune.runtime.workspace import Workspace
    from fedtune.tracking import check_installed

    check_installed(cfg)
    check_delta(cfg, [len(p) for p in Workspace(cfg).partitions()])
    preflight(cfg)


def simulate(cfg: RunConfig, out_dir: str | Path, resume: bool = False, sweep: Path | None = None) -> dict[str, Any]:
    """Run ``cfg`` in simulation, write ``out_dir``, return its ``summary.json``; bad input
    raises a :class:`~fedtune.errors.ConfigError` before Ray starts (:func:`check_before_ray`).

    ``resume``: continue ``out_dir`` from its checkpoint (:func:`fedtune.flower.server_app.resume_point`).
    ``sweep``: the Hydra multirun directory ``out_dir`` is a job of (groups its tracked runs).
    """
    quiet_libraries(cfg.runtime.log_level)
    check_before_ray(cfg)
    import ray
    from flwr.simulation import run_simulation

    from fedtune.flower.client_app import make_client_app
    from fedtune.flower.server_app import make_server_app

    out_dir = Path(out_dir).resolve()
    cluster = None
    try:
        if cfg.runtime.ray_address:
            cluster = attach_cluster(cfg)
        drop_run_simulation_deprecation()
        with (fast_message_pump(cfg.runtime.fast_message_pump),
              capture_roster(cfg.runtime.node_map == "engine") as roster, quiet_actor_shutdown(),
              warm_actors(cfg.runtime.warm_actors)):
            run_simulation(server_app=make_server_app(cfg, out_dir, resume, roster, sweep),
                           client_app=make_client_app(cfg.to_dict()),
                           num_supernodes=cfg.federation.num_clients, backend_config=backend_config(cfg))
    finally:
        if ray.is_initialized():
            ray.shutdown()
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {"status": "missing"}
    if summary.get("status") != "completed":
        raise RuntimeError(f"simulation did not complete: {summary.get('error', summary.get('status'))}")
    if cluster is not None:  # recorded next to the results: which cluster ran them
        summary["ray_cluster"] = cluster
        atomic_write_text(summary_path, json.dumps(summary, indent=2, default=str) + "\n")
    return summary
