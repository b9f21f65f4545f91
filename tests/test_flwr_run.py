"""`flwr run .` drives the same ServerApp/ClientApp (pyproject [tool.flwr.app] components)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.simulation


def _flower_processes(flwr_home: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.info["cmdline"] and any("flower-superlink" in c or "flwr-" in c for c in proc.info["cmdline"]) \
                    and proc.environ().get("FLWR_HOME") == str(flwr_home):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_flwr_run_uses_the_same_app(tmp_path: Path) -> None:
    home, out = tmp_path / "flwr-home", tmp_path / "out"
    home.mkdir()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39391", "FLWR_LOCAL_CONTROL_API_PORT": "39393",
           "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.02"}
    overrides = "model=tiny dataset=tiny federation.num_clients=3 num_rounds=2 seed=5"
    cmd = [str(bin_dir / "flwr"), "run", str(REPO), "--stream",
           "--federation-config", "num-supernodes=3 client-resources-num-cpus=1 init-args-num-cpus=2",
           "--run-config", f'overrides="{overrides}" output-dir="{out}"']
    try:
        proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    finally:
        for p in _flower_processes(home):  # `flwr run` leaves a detached SuperLink behind
            p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _flower_processes(home) and time.monotonic() < deadline:
            time.sleep(0.5)
        for p in _flower_processes(home):
            p.kill()
    # `flwr run --stream` exits 0 even when the ServerApp fails: assert on the results.
    summary_path = out / "summary.json"
    assert summary_path.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "completed", summary
    assert summary["num_rounds"] == 2 and summary["strategy"] == "fedavg_lora"
    lines = (out / "metrics.csv").read_text().splitlines()
    assert len(lines) == 1 + 3
    assert "[round   2/2]" in proc.stdout
