"""Checkpoint and resume (issue 7).

* Every method's ``state_dict`` survives the checkpoint (safetensors + JSON, written and
  read back through the real files, with no pickle), and a restored FedKSeed-Pro /
  Ferret server aggregates the next round bit-identically to the one that never stopped.
* End to end (conftest.py, driven by ``simulations/study.py``): ``fedtune run ...
  faults.server_kill_round=2`` SIGKILLs the server after
  round 2's checkpoint; ``fedtune run resume=RUN_DIR`` continues it, and the result has
  exactly the metrics and the adapter of the uninterrupted same-seed run of conftest.py.
* Private runs (DP-SGD, client-level DP) killed and resumed end with the same ε, metrics
  and adapter as uninterrupted ones (tests/test_private_resume.py).
* A resume that cannot be exact (other settings) and a truncated or changed checkpoint
  are refused in one line.
"""

from __future__ import annotations

import csv
import json
import math
import pickle
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import without_control
from safetensors.torch import load_file

from fedtune.cli import main as cli_main
from fedtune.comm.ledger import WireRecord
from fedtune.config import compose
from fedtune.flower.strategy import ClientUpdate, FedtuneStrategy, RoundInfo
from fedtune.registry import METHODS
from fedtune.results.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from fedtune.results.store import TIMING_COLUMNS, RunStore
from fedtune.runtime.workspace import Workspace

TINY = "model=tiny dataset=tiny federation.num_clients=4"
METHOD_OVERRIDES = {"fedkseed": "strategy.num_seeds=64 strategy.local_steps=20",
                    "fedkseed_pro": "strategy.num_seeds=64 strategy.local_steps=20", "ferret": "strategy.num_seeds=16",
                    "sfprompt": "model.max_length=24"}  # P=8 prompts + 24 tokens fit its 32 positions


def _strategy(name: str) -> tuple[Any, FedtuneStrategy]:
    cfg = compose(f"{TINY} strategy={name} {METHOD_OVERRIDES.get(name, '')}")
    strategy = METHODS.get(name).strategy_cls.from_config(cfg)
    strategy.initialize(Workspace(cfg).initial_arrays())
    return cfg, strategy


def _same(a: Any, b: Any) -> bool:
    """Deep equality with tensors compared exactly (values, dtype, shape)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return isinstance(b, float) and (a == b or (math.isnan(a) and math.isnan(b)))
    if hasattr(a, "__dict__") and not isinstance(a, type):
        return type(a) is type(b) and _same(vars(a), vars(b))
    return a == b


@pytest.mark.parametrize("name", METHODS.names())
def test_checkpoint_round_trips_every_methods_state(name: str, tmp_path: Path) -> None:
    cfg, strategy = _strategy(name)
    state = strategy.state_dict()
    assert {"global_arrays", "ledger", "rounds", "client_epsilon"} <= set(state)
    assert not {"node_of", "partition_of_node", "roster"} & set(state)  # a new run has new node ids
    save_checkpoint(tmp_path, 4, state, cfg.to_dict())
    loaded = load_checkpoint(tmp_path)
    assert loaded["round"] == 4 and loaded["config"] == cfg.to_dict()
    _, fresh = _strategy(name)
    fresh.load_state_dict(loaded["strategy"])
    assert _same(fresh.state_dict(), state)
    assert not list(tmp_path.glob(".*.tmp"))
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]


def _seed_updates(name: str, strategy: Any, round_seed: int) -> list[ClientUpdate]:
    """Valid uploads of 3 clients: FedKSeed (seed index, scalar) pairs; Ferret per-block coordinates."""
    gen = torch.Generator().manual_seed(round_seed)
    out = []
    for pid in range(3):
        if name == "ferret":
            counts = torch.full((len(strategy.blocks),), 2, dtype=torch.int32)
            n = int(counts.sum())
            arrays = {"counts": counts, "indices": torch.randint(0, strategy.config.num_seeds, (n,), generator=gen,
                                                                   dtype=torch.int16),
                      "values": 1e-3 * torch.randn(n, generator=gen)}
        else:
            arrays = {"indices": torch.randint(0, strategy.config.num_seeds, (20,), generator=gen, dtype=torch.int16),
                      "values": torch.randn(20, generator=gen)}
        out.append(ClientUpdate(pid, 10 + 5 * pid, arrays, {}))
    return out


@pytest.mark.parametrize("name", ["fedkseed_pro", "ferret"])
def test_a_restored_server_aggregates_the_next_round_identically(name: str, tmp_path: Path) -> None:
    cfg, original = _strategy(name)
    original.global_arrays = original.aggregate(1, _seed_updates(name, original, 1))
    original.rounds[1] = RoundInfo(sampled=[0, 1, 2], received=[0, 2], failures={1: "crashed"}, train_loss=0.5)
    save_checkpoint(tmp_path, 1, original.state_dict(), cfg.to_dict())
    _, restored = _strategy(name)
    restored.load_state_dict(load_checkpoint(tmp_path)["strategy"])
    assert repr(restored.rounds) == repr(original.rounds) and math.isnan(restored.rounds[1].epsilon)  # NaN != NaN
    round2 = _seed_updates(name, original, 2)
    a, b = original.aggregate(2, round2), restored.aggregate(2, round2)
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    for attr in ("accumulators", "probabilities", "abs_sum") if name != "ferret" else ("coefficients",):
        assert torch.equal(getattr(original, attr), getattr(restored, attr)), attr
    moved = original.replica.theta - original.replica.theta0
    assert float(moved.norm()) > 0  # the rounds changed the model: the comparison is not vacuous


# ----------------------------------------------------------------------------- end to end
@pytest.mark.simulation
def test_a_killed_run_stops_at_its_last_checkpoint(killed_then_resumed: dict[str, Any]) -> None:
    state = killed_then_resumed["killed"]  # conftest.py: run by simulations/study.py through the CLI
    assert state["rc"] == 1 and f"fedtune run exited {-signal.SIGKILL}" in state["stdout"], state["log"][-2000:]
    assert "faults.server_kill_round=2: killing the server" in state["log"]
    assert state["summary"]["status"] == "running"  # never finished: no clean-up ran
    assert state["rounds"] == ["0", "1", "2"] and state["checkpoint_round"] == 2


@pytest.mark.simulation
def test_resumed_run_equals_the_uninterrupted_run(killed_then_resumed: dict[str, Any],
                                                  same_seed_runs: list[Path]) -> None:
    resumed, run_dir, reference = killed_then_resumed["resumed"], killed_then_resumed["dir"], same_seed_runs[0]
    assert resumed["rc"] == 0 and "seed 3: resumed" in resumed["stdout"], resumed["log"][-3000:]
    assert "resumed after round 2" in resumed["log"]
    rows = [without_control(d) for d in (run_dir, reference)]  # the reference held a roll-call (conftest.py)
    wire = ("bytes_up", "bytes_down", "cumulative_bytes")  # envelopes carry random node ids (test_simulation)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_COLUMNS + wire} for r in rs]  # noqa: E731
    assert [r["round"] for r in rows[0]] == ["0", "1", "2", "3"]
    assert strip(rows[0]) == strip(rows[1])
    for a, b in zip(rows[0][1:], rows[1][1:]):
        assert abs(int(a["bytes_up"]) - int(b["bytes_up"])) <= 3 * 8
    adapters = [load_file(d / "adapter" / "adapter_model.safetensors") for d in (run_dir, reference)]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    summary = json.loads((run_dir / "summary.json").read_text())
    expected = json.loads((reference / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_round"] == 2
    assert summary["final_accuracy"] == expected["final_accuracy"]
    assert summary["final_eval_loss"] == expected["final_eval_loss"]
    ledger = list(csv.DictReader(open(run_dir / "ledger.csv")))
    restart = [r for r in ledger if r["kind"] == "resume"]
    assert restart == [] and summary["resume_bytes"] == 0  # the new process read the engine's node map


# ----------------------------------------------------------------------------- refusals
def _checkpointed_dir(tmp_path: Path, overrides: str) -> Path:
    cfg = compose(f"{TINY} {overrides}")
    store = RunStore(tmp_path)
    store.write_config(cfg.to_dict())
    store.add_round({"round": 0, "eval_accuracy": "0.25", "wall_seconds": "1.0"})
    _, strategy = _strategy(cfg.strategy.name)
    save_checkpoint(tmp_path, 1, strategy.state_dict(), cfg.to_dict())
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["seed=1"], "resume: only num_rounds=N may be given with resume=RUN_DIR"),
    (["num_rounds=x"], "num_rounds must be an integer"),
    (["num_rounds=0"], "num_rounds must be >= 1"),
])
def test_resume_refuses_other_overrides(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                        message: str) -> None:
    run_dir = _checkpointed_dir(tmp_path, "")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["run", f"resume={run_dir}", *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def test_resume_refuses_a_changed_config_and_a_missing_checkpoint(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    changed = _checkpointed_dir(tmp_path / "changed", "")
    text = (changed / "config.yaml").read_text()
    assert "\nseed: 0\n" in text
    (changed / "config.yaml").write_text(text.replace("\nseed: 0\n", "\nseed: 5\n"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((changed / "config.yaml").read_text())
    for run_dir, message in ((changed, "seed differ"), (empty, f"has no {CHECKPOINT}")):
        with pytest.raises(SystemExit):
            cli_main(["run", f"resume={run_dir}"])
        assert message in capsys.readouterr().err, message


def _tensor_file(run_dir: Path) -> Path:
    return run_dir / json.loads((run_dir / CHECKPOINT).read_text())["tensors"]


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _edit_round(path: Path) -> None:
    path.write_text(path.read_text().replace('"round": 1', '"round": 0'))


@pytest.mark.parametrize("damage, message", [
    (lambda d: _flip_last_byte(_tensor_file(d)), "is truncated or was changed (its SHA-256"),
    (lambda d: _tensor_file(d).write_bytes(_tensor_file(d).read_bytes()[:-100]), "is truncated or was changed"),
    (lambda d: (d / CHECKPOINT).write_bytes((d / CHECKPOINT).read_bytes()[:-40]), "is not a readable checkpoint"),
    (lambda d: _edit_round(d / CHECKPOINT), "was changed after it was written"),
    (lambda d: _tensor_file(d).unlink(), "which"),
])
def test_a_tampered_or_truncated_checkpoint_is_refused_before_anything_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, damage: Any,
        message: str) -> None:
    run_dir = _checkpointed_dir(tmp_path, "")
    text = (run_dir / CHECKPOINT).read_text()
    assert '"round": 1' in text  # what _edit_round changes
    damage(run_dir)
    import fedtune.runtime.simulation as simulation

    def must_not_run(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the simulation started on a refused checkpoint")

    monkeypatch.setattr(simulation, "simulate", must_not_run)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["run", f"resume={run_dir}"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1, err


def test_checkpoints_are_read_without_pickle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files are a safetensors tensor file and JSON; reading them and loading every kind of
    state (tensors, tuples, int-keyed dicts, NaN) works with every unpickler disabled."""
    cfg, strategy = _strategy("fedkseed_pro")
    strategy.rounds[1] = RoundInfo(sampled=[2, 0], received=[0], failures={2: "gone"})
    strategy.client_epsilon = {0: 1.5, 2: math.inf}
    strategy.ledger.records = [WireRecord(1, 0, "down", "train", 900, 512, node_id=77),
                               WireRecord(1, -1, "up", "control", 60, 0), WireRecord(2, 2, "up", "resume", 5, 4)]
    save_checkpoint(tmp_path, 1, strategy.state_dict(), cfg.to_dict(), {"histories": {0: [(1.1, 0.25, 8)]}})
    manifest = json.loads((tmp_path / CHECKPOINT).read_text())  # plain JSON (no NaN literals either)
    assert set(manifest) == {"format", "tensors", "tensors_sha256", "content_sha256", "content"}
    tensors = load_file(_tensor_file(tmp_path))  # a valid safetensors file
    assert tensors and all(isinstance(t, torch.Tensor) for t in tensors.values())

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pickle used to read a checkpoint")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    loaded = load_checkpoint(tmp_path)
    assert loaded["privacy"] == {"histories": {0: [(1.1, 0.25, 8)]}}
    _, fresh = _strategy("fedkseed_pro")
    fresh.load_state_dict(loaded["strategy"])
    assert _same(fresh.state_dict(), strategy.state_dict())
    assert fresh.client_epsilon == {0: 1.5, 2: math.inf} and fresh.rounds[1].failures == {2: "gone"}
    assert fresh.ledger.records == strategy.ledger.records and fresh.ledger.records[0].node_id == 0  # ids left out


def test_another_methods_state_is_refused_in_one_line(tmp_path: Path) -> None:
    _, fedavg = _strategy("fedavg_lora")
    _, fedkseed = _strategy("fedkseed")
    with pytest.raises(ValueError, match=r"^FedKSeed: the checkpoint's state does not fit this method "
                                         r"\(missing abs_sum, accumulators"):
        fedkseed.load_state_dict(fedavg.state_dict())


def test_a_dp_run_calibrated_to_its_rounds_resumes_only_with_them(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """σ was calibrated to num_rounds (no planned_rounds): another num_rounds would change σ mid-run."""
    run_dir = _checkpointed_dir(tmp_path, "privacy=dp_sgd privacy.target_epsilon=3 privacy.delta=1e-3 num_rounds=4")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["run", f"resume={run_dir}", "num_rounds=6"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "calibrated its DP noise to num_rounds=4" in err, err
