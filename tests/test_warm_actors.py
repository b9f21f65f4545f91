"""``runtime.warm_actors``: a run on an attached cluster leaves its client actor running, the
next run reuses that process, and the results are those of a fresh actor.

The suite's in-process simulations all run this way (conftest ``on_shared_ray``); this test
starts from no warm actor, so its first run has a fresh one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import SIMULATION_OVERRIDES, end_warm_actors, on_shared_ray

from fedtune.config import compose
from fedtune.errors import ConfigError
from fedtune.results.store import TIMING_COLUMNS, read_ledger, read_metrics
from fedtune.runtime import flower_private
from fedtune.runtime.simulation import simulate

pytestmark = pytest.mark.simulation
WIRE = ("bytes_up", "bytes_down", "cumulative_bytes")  # message metadata holds the run's random id
RUN = "federation.num_clients=3 num_rounds=2 seed=5 strategy=fedkseed strategy.num_seeds=64 strategy.local_steps=8"


def warm_actor_pids(address: str) -> dict[str, int]:
    """Name -> process id of each warm actor on the cluster (asked of the actor itself)."""
    import ray

    ray.init(address=address)
    try:
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == flower_private.WARM_NAMESPACE]
        return {n: ray.get(ray.get_actor(n, namespace=flower_private.WARM_NAMESPACE)
                           .__ray_call__.remote(lambda actor: os.getpid())) for n in names}
    finally:
        ray.shutdown()


def test_a_warm_actor_is_reused_and_changes_no_result(ray_address: str, tmp_path: Path) -> None:
    end_warm_actors(ray_address)
    cfg = compose(f"{SIMULATION_OVERRIDES} {RUN} {on_shared_ray(ray_address)}".split())
    simulate(cfg, tmp_path / "fresh")
    first = warm_actor_pids(ray_address)
    simulate(cfg, tmp_path / "warm")
    assert len(first) == 1 and warm_actor_pids(ray_address) == first  # the same process served both runs
    strip = lambda rows: [{k: v for k, v in r.items() if k not in (*TIMING_COLUMNS, *WIRE)} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "warm")) == strip(read_metrics(tmp_path / "fresh"))
    assert [r["payload_bytes"] for r in read_ledger(tmp_path / "warm")] == \
        [r["payload_bytes"] for r in read_ledger(tmp_path / "fresh")]


def test_a_run_without_warm_actors_ends_the_idle_ones(ray_address: str, tmp_path: Path) -> None:
    """Flower sizes its pool from the cluster's CPUs: an idle warm actor holding them would
    leave the new pool's actors unscheduled, so a run that does not want them ends them."""
    overrides = f"{SIMULATION_OVERRIDES} {RUN} num_rounds=1 {on_shared_ray(ray_address)}".split()
    simulate(compose(overrides), tmp_path / "warm")
    assert len(warm_actor_pids(ray_address)) == 1
    simulate(compose([*overrides, "runtime.warm_actors=false"]), tmp_path / "cold")
    assert warm_actor_pids(ray_address) == {}


def test_warm_actors_need_an_attached_cluster() -> None:
    with pytest.raises(ConfigError, match=r"^runtime.warm_actors needs runtime.ray_address"):
        compose(["runtime.warm_actors=true"])
