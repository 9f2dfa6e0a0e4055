"""The master's view of a child: phases move one way, retiring is remembered."""

from __future__ import annotations

import pytest

from greentask.daemon.children import ChildPhase, WorkerProcess
from greentask.daemon.lifecycle import StateError


def child() -> WorkerProcess:
    return WorkerProcess(pid=123, slot_index=0, generation=1, number=1, started_at=0.0)


def test_a_retired_child_that_hangs_is_aborted_and_stays_retired():
    worker = child()
    worker.retire("reload")
    assert worker.phase is ChildPhase.RETIRING and worker.retired
    worker.enter(ChildPhase.ABORTED, now=5.0)
    assert worker.phase_since == 5.0 and worker.retire_cause == "reload"
    with pytest.raises(StateError, match="worker 123 cannot move from aborted to serving"):
        worker.enter(ChildPhase.SERVING)


def test_retiring_an_aborted_child_records_the_cause_without_moving_it():
    worker = child()
    worker.enter(ChildPhase.ABORTED)
    worker.retire("failed reload")
    assert worker.phase is ChildPhase.ABORTED and worker.retired
