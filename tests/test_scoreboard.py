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
    outcomes = {name: row[:4] for name, row in master_view.functions().items()}
    assert outcomes == {"echo": [5, 2, 1, 0], "send_bulk": [1, 0, 0, 0]}
    assert (master_view.get(DONE), master_view.get(FAILED), master_view.get(TIMED_OUT)) == \
        (6, 2, 1)
    assert board.slot(1).functions() == {}


def test_each_function_has_its_own_duration_histogram_beside_the_process_one():
    board = scoreboard.Scoreboard(1)
    child = board.slot(board.claim(generation=1))
    for seconds in (0.00005, 0.00005, 0.003):
        child.observe("echo", seconds)
    child.observe("sleep", 40.0)  # past the last bound: the open bucket
    counts = board.slot(0).functions()
    buckets = len(scoreboard.DURATION_BUCKETS) + 1
    assert len(counts["echo"]) == scoreboard.FUNCTION_ROW == 4 + buckets
    echo = counts["echo"][4:]
    assert echo[0] == 2 and echo[scoreboard.DURATION_BUCKETS.index(0.005)] == 1 \
        and sum(echo) == 3
    assert counts["sleep"][4:] == [0] * (buckets - 1) + [1]
    process = [board.slot(0).get(scoreboard.DURATION_BUCKET + i) for i in range(buckets)]
    assert process == [a + b for a, b in zip(echo, counts["sleep"][4:], strict=True)]


def test_a_childs_activity_is_read_whole_and_its_mailbox_in_order():
    from greentask.daemon.activity import DOCUMENT_BYTES, MAILBOX

    board = scoreboard.Scoreboard(2)
    index = board.claim(generation=1)
    child = board.activity.of(index)
    assert board.activity.read(index) is None  # nothing published yet
    child.publish({"at": 1.0, "running": [{"function": "sleep"}], "failures": []})
    assert board.activity.read(index)["running"] == [{"function": "sleep"}]
    # Too big for the region: the longest list is halved until it fits.
    child.publish({"at": 2.0, "running": [], "failures": ["x" * 1000] * 100})
    document = board.activity.read(index)
    assert document["at"] == 2.0 and 0 < len(document["failures"]) < 100
    assert len(str(document)) < DOCUMENT_BYTES
    # While the child writes (odd sequence), the master reads nothing half-done.
    board.activity._headers[2 * index] += 1
    assert board.activity.read(index) is None
    board.activity._headers[2 * index] += 1
    assert child.new_cancels() == []
    for key in range(3):
        board.activity.post(index, (key, key * 10))
    assert child.new_cancels() == [(0, 0), (1, 10), (2, 20)]
    assert child.new_cancels() == []
    for key in range(MAILBOX + 5):  # more than the mailbox holds: the newest are kept
        board.activity.post(index, (key, 0))
    assert [key for key, _ in child.new_cancels()] == list(range(5, MAILBOX + 5))
    board.release(index)
    assert board.activity.read(board.claim(generation=2)) is None  # a new child starts empty


def test_names_past_the_table_share_one_row_and_a_new_child_starts_empty():
    board = scoreboard.Scoreboard(1)
    child = board.slot(board.claim(generation=1))
    for i in range(MAX_FUNCTIONS + 10):
        child.count_task(f"task_{i}_" + "x" * 100, DONE)  # long names are cut, not spilled
    counts = board.slot(0).functions()
    assert len(counts) == MAX_FUNCTIONS
    assert counts[OTHER_FUNCTION][:4] == [11, 0, 0, 0]
    assert sum(row[0] for row in counts.values()) == MAX_FUNCTIONS + 10
    assert all(len(name.encode()) < scoreboard.NAME_BYTES for name in counts)
    board.release(0)
    assert board.slot(board.claim(generation=2)).functions() == {}


def test_totals_survive_in_the_master_when_a_worker_is_gone():
    def row(*counts: float) -> list[float]:
        return [*counts, *[0.0] * (scoreboard.FUNCTION_ROW - len(counts))]
    totals: dict[str, list[float]] = {"echo": row(1, 0, 0, 1, 1)}
    scoreboard.add_function_counts(totals, {"echo": row(2, 1, 0, 0, 3),
                                            "fail": row(0, 3, 0, 0, 0, 3)})
    assert totals == {"echo": row(3, 1, 0, 1, 4), "fail": row(0, 3, 0, 0, 0, 3)}


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
