"""The shared scoreboard's function table, in-process (the daemon tests use it through fork)."""

from __future__ import annotations

import pytest

from greentask.daemon import scoreboard
from greentask.daemon.scoreboard import DONE, FAILED, MAX_FUNCTIONS, OTHER_FUNCTION, TIMED_OUT


def test_counts_by_function_and_outcome_add_up_to_the_slot_totals():
    board = scoreboard.Scoreboard(2)
    child = board.slot(board.claim(generation=1))
    for outcome, times in ((DONE, 5), (FAILED, 2), (TIMED_OUT, 1)):
        for _ in range(times):
            child.count_task("echo", outcome)
    child.count_task("send_bulk", DONE)
    master_view = board.slot(0)  # a fresh Slot, as the master makes them
    assert master_view.functions() == {"echo": [5, 2, 1, 0], "send_bulk": [1, 0, 0, 0]}
    assert (master_view.get(DONE), master_view.get(FAILED), master_view.get(TIMED_OUT)) == \
        (6, 2, 1)
    assert board.slot(1).functions() == {}


def test_names_past_the_table_share_one_row_and_a_new_child_starts_empty():
    board = scoreboard.Scoreboard(1)
    child = board.slot(board.claim(generation=1))
    for i in range(MAX_FUNCTIONS + 10):
        child.count_task(f"task_{i}_" + "x" * 100, DONE)  # long names are cut, not spilled
    counts = board.slot(0).functions()
    assert len(counts) == MAX_FUNCTIONS
    assert counts[OTHER_FUNCTION] == [11, 0, 0, 0]
    assert sum(row[0] for row in counts.values()) == MAX_FUNCTIONS + 10
    assert all(len(name.encode()) < scoreboard.NAME_BYTES for name in counts)
    board.release(0)
    assert board.slot(board.claim(generation=2)).functions() == {}


def test_totals_survive_in_the_master_when_a_worker_is_gone():
    totals: dict[str, list[float]] = {"echo": [1.0, 0.0, 0.0, 1.0]}
    scoreboard.add_function_counts(totals, {"echo": [2.0, 1.0, 0.0, 0.0],
                                            "fail": [0.0, 3.0, 0.0, 0.0]})
    assert totals == {"echo": [3.0, 1.0, 0.0, 1.0], "fail": [0.0, 3.0, 0.0, 0.0]}


def test_every_state_change_is_checked_against_the_table():
    from greentask.daemon.lifecycle import StateError, WorkerState

    board = scoreboard.Scoreboard(1)
    child = board.slot(board.claim(generation=1))
    assert child.state is WorkerState.BOOTING
    child.set_state(WorkerState.READY)
    child.set_state(WorkerState.RECYCLE)
    with pytest.raises(StateError, match="cannot move from recycle to ready"):
        child.set_state(WorkerState.READY)
    assert child.state is WorkerState.RECYCLE  # a refused move writes nothing
    child.set_state(WorkerState.DRAINING)
    assert child.as_dict()["state"] == "draining"
    board.release(0)
    with pytest.raises(StateError, match="cannot move from free to ready"):
        board.slot(0).set_state(WorkerState.READY)
