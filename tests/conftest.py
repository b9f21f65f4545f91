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

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _ray_shut_down():
    yield
    import sys

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
