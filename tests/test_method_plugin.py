"""A method from a package outside fedtune: registered through a ``fedtune.methods`` entry
point, it passes the method contract and runs a real Ray round, touching no fedtune file.

The package is written into a temporary directory with an installed-package record
(``toyfed-0.1.dist-info`` with ``entry_points.txt``), put on ``sys.path`` here and on
``PYTHONPATH`` for the Ray workers.  It ships its strategy (a weighted mean of the
classifier head), its trainer (first-order steps on the head alone) and its config class,
which is the whole of its config: ``strategy=toy_head_avg`` needs no YAML file.
"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest
from method_testing import (check_declared_privacy, check_identical_updates, check_malformed_rejected,
                            check_payload_bytes, check_spec, check_state_round_trip, check_sum_only, run_method,
                            task_identity)  # noqa: F401  (a fixture)

import fedtune
import fedtune.registry as registry
from fedtune.config import compose
from fedtune.errors import ConfigError
from fedtune.registry import METHODS, TRAINERS, load_plugins

NAME = "toy_head_avg"

METHOD = '''
"""Head-only federated averaging: clients train the classifier head, the server averages it."""

from dataclasses import dataclass

from clients.local_steps import run_local_steps
from fedtune.capabilities import UNIFORM_WEIGHTING, Capabilities, Export, Payload, Support
from fedtune.config.method import MethodConfig
from fedtune.flower.strategy import FedtuneStrategy, weights_for
from fedtune.models.state import load_trainable_state, trainable_state
from fedtune.registry import TRAINERS, register_method


@dataclass
class ToyConfig(MethodConfig):
    name: str = "toy_head_avg"


class ToyHeadAvg(FedtuneStrategy):
    name = "toy_head_avg"

    def aggregate(self, server_round, updates):
        weights = weights_for(updates, self.weighting)
        return {k: sum(w * u.arrays[k].double() for w, u in zip(weights, updates)).float()
                for k in updates[0].arrays}


class HeadTrainer:
    def build_model(self, base, cfg):
        for name, p in base.named_parameters():
            p.requires_grad_(name.startswith("classifier."))
        base.eval()
        return base

    def train(self, model, arrays, workspace, ctx):
        load_trainable_state(model, arrays)
        loss = run_local_steps(model, workspace, ctx)
        return trainable_state(model), {"train-loss": loss,
                                        "num-examples": len(workspace.partitions()[ctx.partition_id])}


def head_bytes(strategy, partition_id, upload):
    n = 4 * sum(v.numel() for v in strategy.global_arrays.values())
    return n, n


TRAINERS.register("toy_head", HeadTrainer())
register_method(
    "toy_head_avg", ToyHeadAvg, trainer="toy_head", config_cls=ToyConfig,
    capabilities=Capabilities(
        example_dp=Support(True, "its clients run fedtune's first-order loop"),
        client_dp=Support(True, "the head is the uniform mean of the uploads", (UNIFORM_WEIGHTING,)),
        sum_only=Support(True, "the head is the weighted sum of the uploads"),
        identical_updates_fixed_point=True),
    payload=Payload(down="the head (fp32)", up="the head (fp32)", formula=head_bytes),
    export=Export("the model (transformers save_pretrained)"))
'''


def write_package(site: Path) -> None:
    pkg = site / "toyfed"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "method.py").write_text(textwrap.dedent(METHOD))
    info = site / "toyfed-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toyfed\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{NAME} = toyfed.method\n")


@pytest.fixture
def toy_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The toy package installed for this test only (registries and modules restored after)."""
    load_plugins()  # fedtune's own methods first, so only the toy is new below
    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))
    monkeypatch.setattr(TRAINERS, "_items", dict(TRAINERS._items))
    monkeypatch.setattr(registry, "_ENTRY_POINTS", set(registry._ENTRY_POINTS))
    assert NAME not in METHODS.names()
    site = tmp_path / "site"
    write_package(site)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]))
    load_plugins(rescan=True)  # an installed package is found by its entry point
    yield site
    for module in [m for m in sys.modules if m == "toyfed" or m.startswith("toyfed.")]:
        del sys.modules[module]


def test_the_entry_point_registers_the_method_without_a_fedtune_file(toy_method: Path) -> None:
    spec = METHODS.get(NAME)
    assert spec.strategy_cls.__module__ == "toyfed.method"
    assert Path(sys.modules["toyfed.method"].__file__).is_relative_to(toy_method)
    repo = Path(fedtune.__file__).resolve().parents[1]
    assert not any(p for d in ("fedtune", "strategies", "clients", "configs") for p in (repo / d).rglob(f"{NAME}*"))
    cfg = compose(["model=tiny", "dataset=tiny", f"strategy={NAME}"])
    assert type(cfg.strategy).__name__ == "ToyConfig" and cfg.strategy.weighting == "examples"
    with pytest.raises(ConfigError, match=rf"^train\.lr_schedule=cosine is not supported by strategy={NAME}: "
                                          "the method does not declare"):  # a capability it did not state
        compose(["model=tiny", "dataset=tiny", f"strategy={NAME}", "train.lr_schedule=cosine"])


def test_the_method_keeps_the_contract(toy_method: Path, task_identity: None) -> None:
    spec = METHODS.get(NAME)
    check_spec(spec)
    run = run_method(NAME)
    check_payload_bytes(run)
    check_identical_updates(run)
    check_state_round_trip(run)
    check_declared_privacy(NAME)
    check_sum_only(run)
    check_malformed_rejected(run)


@pytest.mark.simulation
def test_one_ray_round(toy_method: Path, tmp_path: Path) -> None:
    from fedtune.runtime.simulation import simulate

    cfg = compose(["model=tiny", "dataset=tiny", f"strategy={NAME}", "federation.num_clients=2", "num_rounds=1",
                   "train.local_steps=2", "eval.max_examples=32"])
    summary = simulate(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["client_failures"] == 0
    assert summary["strategy"] == NAME and summary["payload_up_per_client_round"] > 0
