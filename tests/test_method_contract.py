"""The contract of every registered method (peft's table-driven style), in process, no Ray.

Each check of :mod:`method_testing` runs over ``METHODS.names()``, so a new method is
covered by being registered: the spec is complete; the payload of every train message,
as the ledger counts it, is the method's own byte formula; identical uploads aggregate
to that upload where the method declares so (and to what one of them alone gives, for
every method); the state round-trips bit for bit; a DP mode the method does not support
is refused at config time with its reason, and so is a quantized base (``model.quantization``)
under a method that does not declare ``quantized_base``; a sum-only method aggregates the same from
any uploads with the same weighted sum; a malformed upload is rejected.
"""

from __future__ import annotations

import pytest
from pathlib import Path

from hf_testing import save_tiny_model
from method_testing import (BASE, Run, check_declared_privacy, check_declared_quantized_base, check_identical_updates,
                            check_malformed_rejected, check_payload_bytes, check_spec, check_state_round_trip,
                            check_sum_only, run_method, task_identity)  # noqa: F401  (a fixture)

from fedtune.config import compose
from fedtune.flower.server_app import privacy_summary
from fedtune.registry import METHODS

NAMES = METHODS.names()
_RUNS: dict[tuple[str, tuple[str, ...]], Run] = {}


def two_rounds(name: str, extra: tuple[str, ...] = (), rounds: int = 2) -> Run:
    """Real rounds of the method (cached: the checks leave them as they found them)."""
    if (name, extra) not in _RUNS:
        _RUNS[name, extra] = run_method(name, extra, rounds)
    return _RUNS[name, extra]


@pytest.mark.parametrize("name", NAMES)
def test_spec_is_complete(name: str) -> None:
    check_spec(METHODS.get(name))


@pytest.mark.parametrize("name", NAMES)
def test_payload_bytes_are_the_methods_formula(name: str, task_identity: None) -> None:
    check_payload_bytes(two_rounds(name))


@pytest.mark.parametrize("name", NAMES)
def test_identical_updates_aggregate_to_that_update(name: str, task_identity: None) -> None:
    check_identical_updates(two_rounds(name))


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips_bit_for_bit(name: str, task_identity: None) -> None:
    check_state_round_trip(two_rounds(name))


@pytest.mark.parametrize("name", NAMES)
def test_declared_privacy_capabilities_hold_at_config_time(name: str) -> None:
    check_declared_privacy(name)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("hf-bert") / "bert", "bert")


@pytest.mark.parametrize("name", NAMES)
def test_declared_quantized_base_holds_at_config_time(name: str, tiny_bert: Path) -> None:
    check_declared_quantized_base(name, str(tiny_bert))


@pytest.mark.parametrize("name", NAMES)
def test_sum_only_aggregate_is_a_function_of_the_weighted_sum(name: str, task_identity: None) -> None:
    support = METHODS.get(name).capabilities.sum_only
    if not support.ok:
        pytest.skip(f"{name} is not sum-only: {support.reason}")
    check_sum_only(two_rounds(name, tuple(support.overrides()), rounds=1))


@pytest.mark.parametrize("name", NAMES)
def test_malformed_update_is_rejected(name: str, task_identity: None) -> None:
    check_malformed_rejected(two_rounds(name))


@pytest.mark.parametrize("name", NAMES)
def test_privacy_summary_discloses_what_a_setup_computes_on_client_data(name: str) -> None:
    spec = METHODS.get(name)
    if not spec.capabilities.example_dp.ok:
        pytest.skip(f"{name} does not support privacy=dp_sgd: {spec.capabilities.example_dp.reason}")
    cfg = compose([*BASE, f"strategy={name}", "privacy=dp_sgd", *spec.quick])
    block = privacy_summary(cfg, spec.strategy_cls.from_config(cfg))["privacy"]
    assert block.get("not_accounted") == (spec.capabilities.setup_note(cfg.strategy) or None)
