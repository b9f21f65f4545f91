"""A completed ``fedtune run`` ends with fedtune's own summary, not with alarms.

The run is the resumed half of ``killed_then_resumed`` (tests/conftest.py): a real
``fedtune run`` process on Ray, its stdout and stderr in one log, so no Ray run is added.
"""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.simulation

ALARMS = ("ClientAppActor.terminate failed",  # Flower's actor shutdown on restartable actors
          "will be retried",
          "is_gradient_checkpointing",  # peft asking transformers for a deprecated property
          "DEPRECATED FEATURE",  # Flower's run_simulation notice
          "Traceback", "Error")


def test_a_completed_run_ends_with_its_summary_and_no_alarm(killed_then_resumed: dict[str, Any]) -> None:
    killed, resumed = killed_then_resumed["killed"], killed_then_resumed["resumed"]
    assert resumed["rc"] == 0
    output = resumed["log"][len(killed["log"]):]  # the log is appended to: the resumed run's own lines
    lines = [line for line in output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("fedtune: results in "), output[-2000:]
    assert any(line.startswith("fedtune: done in ") for line in lines), output[-2000:]
    found = [(alarm, line) for line in lines for alarm in ALARMS if alarm in line]
    assert found == [], output[-4000:]
