"""Test environment: offline, no telemetry, a private FLWR_HOME, Ray always shut down."""

import atexit
import os
import shutil
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
if "FLWR_HOME" not in os.environ:  # a private one, removed when the session ends
    os.environ["FLWR_HOME"] = tempfile.mkdtemp(prefix="fedtune-flwr-home-")
    atexit.register(shutil.rmtree, os.environ["FLWR_HOME"], True)
os.environ["MPLBACKEND"] = "Agg"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SIMULATION_OVERRIDES = "model=tiny dataset=tiny federation.num_clients=4 num_rounds=3 seed=3 train.local_steps=8"


@pytest.fixture(scope="session")
def same_seed_runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real Ray simulations of ``SIMULATION_OVERRIDES`` (same seed), shared by the
    end-to-end tests (tests/test_simulation.py) and the resume test (tests/test_resume.py),
    so the suite pays for them once."""
    from fedtune.config import compose
    from fedtune.runtime.simulation import simulate

    out = []
    for i in range(2):
        run_dir = tmp_path_factory.mktemp(f"run{i}")
        simulate(compose(SIMULATION_OVERRIDES), run_dir)
        out.append(run_dir)
    return out


@pytest.fixture(autouse=True)
def _ray_shut_down():
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
