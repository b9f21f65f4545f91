"""Private runs resume exactly (issue 21, item 5), without Ray.

A run on the in-process grid (``LocalGrid``: the real ClientApp, one persistent
``Context`` per node) is SIGKILLed after round k's checkpoint in a child process
(``faults.server_kill_round=k``); resuming it here on a *new* grid loses every client's
``Context.state``, exactly as a restarted simulation does.  It must end with the metrics,
ε and adapter of the uninterrupted run:

* DP-SGD: the budget runs out after ``planned_rounds=2``, so a client whose accountant
  history were lost would train again in round 3 (and report a smaller ε); the server's
  copy of the histories (derived from the replies) equals the clients' own.
* client-level DP: the rounds released (ε) and the seeded noise of the next round.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedtune.config import compose
from fedtune.flower.client_app import load_client_state
from fedtune.flower.server_app import run_server
from fedtune.privacy.accounting import load_history
from fedtune.results.checkpoint import load_checkpoint
from fedtune.results.store import TIMING_COLUMNS
from method_testing import LocalGrid, task_identity  # noqa: F401  (fixture)

BASE = "model=tiny dataset=tiny federation.num_clients=3 runtime.device=cpu eval.max_examples=16"
DP_SGD = (f"{BASE} train.local_steps=1 num_rounds=3 privacy=dp_sgd privacy.target_epsilon=3 "
          "privacy.planned_rounds=2")
CLIENT_DP = (f"{BASE} train.local_steps=1 num_rounds=2 privacy=client_dp strategy.weighting=uniform "
             "privacy.clipping_norm=0.5")
KILLED_RUN = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from flwr.supercore.task_identity import TaskIdentity
for attr in ("_run_id", "_node_id", "_task_id"):
    setattr(TaskIdentity, attr, 1)
from fedtune.config import compose
from fedtune.flower.server_app import run_server
from method_testing import LocalGrid
cfg = compose(sys.argv[1])
run_server(LocalGrid(cfg, cfg.federation.num_clients), cfg, Path(sys.argv[2]))
"""
WIRE = ("bytes_up", "bytes_down", "cumulative_bytes")  # a resume adds its roll-call and the given-back histories


def _killed_at(overrides: str, kill_round: int, run_dir: Path) -> None:
    """Run ``overrides`` in a child process that the server SIGKILLs after round ``kill_round``."""
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, f"{overrides} faults.server_kill_round={kill_round}",
                           str(run_dir), str(Path(__file__).parent)], capture_output=True, text=True, timeout=500)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert f"faults.server_kill_round={kill_round}: killing the server" in proc.stdout
    assert load_checkpoint(run_dir)["round"] == kill_round


def _rows(run_dir: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader(open(run_dir / "metrics.csv", newline="")))
    return [{k: v for k, v in r.items() if k not in TIMING_COLUMNS + WIRE} for r in rows]


def _same_ending(resumed: Path, reference: Path) -> dict:
    """Assert equal metrics (but wire bytes and timings) and a bit-identical adapter; the two summaries."""
    assert _rows(resumed) == _rows(reference)
    adapters = [load_file(d / "adapter" / "adapter_model.safetensors") for d in (resumed, reference)]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    summaries = [json.loads((d / "summary.json").read_text()) for d in (resumed, reference)]
    assert summaries[0]["status"] == "completed" and summaries[0]["final_accuracy"] == summaries[1]["final_accuracy"]
    return {"resumed": summaries[0], "reference": summaries[1]}


def _histories(grid: LocalGrid) -> dict[int, list]:
    return {int(c.node_config["partition-id"]): load_history(load_client_state(c)) for c in grid.contexts.values()}


def test_a_killed_dp_sgd_run_resumes_to_the_same_epsilon_and_model(task_identity: None, tmp_path: Path) -> None:
    cfg = compose(DP_SGD)
    reference_grid = LocalGrid(cfg, 3)
    run_server(reference_grid, cfg, tmp_path / "reference")
    _killed_at(DP_SGD, 1, tmp_path / "run")
    resumed_grid = LocalGrid(cfg, 3)  # new contexts: the clients' accountant histories are gone
    summary = run_server(resumed_grid, cfg, tmp_path / "run", resume=True)
    assert summary["resumed_from_round"] == 1
    out = _same_ending(tmp_path / "run", tmp_path / "reference")
    rows = _rows(tmp_path / "run")
    assert [int(r["num_replies"]) for r in rows[1:]] == [3, 3, 0]  # the budget stop holds across the kill
    privacy = [out[k]["privacy"] for k in ("resumed", "reference")]
    assert privacy[0] == privacy[1] and 0 < privacy[0]["final_epsilon"] <= 3
    assert privacy[0]["clients_out_of_budget"] == [0, 1, 2]
    # the server's copy of the histories is the clients' own, and they got it back
    clients = _histories(reference_grid)
    assert all(h and sum(t for _, _, t in h) == 2 * cfg.train.local_steps for h in clients.values())
    assert _histories(resumed_grid) == clients
    server = load_checkpoint(tmp_path / "run")["privacy"]["histories"]
    assert {pid: [tuple(row) for row in h] for pid, h in server.items()} == clients


def test_a_killed_client_dp_run_resumes_to_the_same_epsilon_and_model(task_identity: None, tmp_path: Path) -> None:
    cfg = compose(CLIENT_DP)
    run_server(LocalGrid(cfg, 3), cfg, tmp_path / "reference")
    _killed_at(CLIENT_DP, 1, tmp_path / "run")
    assert load_checkpoint(tmp_path / "run")["privacy"] == {"released": [1], "withheld": []}
    run_server(LocalGrid(cfg, 3), cfg, tmp_path / "run", resume=True)
    out = _same_ending(tmp_path / "run", tmp_path / "reference")
    privacy = [out[k]["privacy"] for k in ("resumed", "reference")]
    assert privacy[0] == privacy[1] and privacy[0]["rounds_released"] == 2
    assert privacy[0]["final_epsilon"] == pytest.approx(float(_rows(tmp_path / "run")[-1]["epsilon"]), abs=1e-6)
