"""Spreading connections over sibling workers, on a real scoreboard and a
stepped clock (the daemon test checks it through fork and the kernel's accept)."""

from __future__ import annotations

from greentask.daemon import scoreboard, spread
from greentask.daemon.lifecycle import WorkerState
from greentask.daemon.spread import AcceptSpread, step_aside


def serving_board(*connections: int) -> scoreboard.Scoreboard:
    board = scoreboard.Scoreboard(len(connections) + 1)  # one slot stays free
    for count in connections:
        slot = board.slot(board.claim(generation=1))
        slot.set_state(WorkerState.READY)
        slot.set(scoreboard.CONNECTIONS, count)
        slot.set(scoreboard.ACCEPTING, 1)
    return board


class SteppedClock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds


def test_a_worker_over_its_share_steps_aside_and_one_at_its_share_does_not():
    board = serving_board(1, 0)
    assert AcceptSpread(board, 0).over_share(0.0)
    assert not AcceptSpread(board, 1).over_share(0.0)
    # A quarter over the fewest is still a fair share.
    assert not AcceptSpread(serving_board(10, 8), 0).over_share(0.0)
    assert AcceptSpread(serving_board(11, 8), 0).over_share(0.0)


def test_only_serving_siblings_count():
    board = serving_board(3, 0, 0)
    board.slot(1).set_state(WorkerState.DRAINING)  # a reload's old worker: not accepting
    board.slot(2).set_state(WorkerState.RECYCLE)  # asked to be replaced, still serving
    board.slot(2).set(scoreboard.CONNECTIONS, 3)
    assert not AcceptSpread(board, 0).over_share(0.0)
    assert not AcceptSpread(serving_board(5), 0).over_share(0.0)  # alone


def test_a_sibling_that_is_not_accepting_is_not_deferred_to():
    # Stepped aside itself, or full: deferring to it would leave nobody accepting.
    board = serving_board(4, 0, 4)
    board.slot(1).set(scoreboard.ACCEPTING, 0)
    assert not AcceptSpread(board, 0).over_share(0.0)
    board.slot(2).set(scoreboard.CONNECTIONS, 2)
    assert AcceptSpread(board, 0).over_share(0.0)  # the accepting one has fewer


def test_stepping_aside_ends_as_soon_as_a_sibling_catches_up():
    board = serving_board(1, 0)
    share = AcceptSpread(board, 0)
    clock = SteppedClock()

    def sibling_accepts(seconds: float) -> None:
        clock.sleep(seconds)
        board.slot(1).set(scoreboard.CONNECTIONS, 1)

    step_aside(share, lambda: True, sibling_accepts, clock)
    assert clock.sleeps == 1
    assert not share.over_share(clock.now)


def test_a_connection_no_sibling_takes_is_taken_back_and_the_rule_rests_longer_each_time():
    board = serving_board(1, 0)  # the sibling never accepts: stuck in a CPU-bound task
    share = AcceptSpread(board, 0)
    clock = SteppedClock()
    rests = []
    for _ in range(7):
        started = clock.now
        step_aside(share, lambda: True, clock.sleep, clock)
        assert spread.UNCLAIMED_WAIT <= clock.now - started < spread.STEP_ASIDE_MAX
        assert not share.over_share(clock.now)  # resting: accept freely
        rest_started = clock.now
        while not share.over_share(clock.now):
            clock.sleep(0.01)
        rests.append(round(clock.now - rest_started, 2))
    assert rests == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
    # Once a step aside works, the next rest is short again.
    board.slot(1).set(scoreboard.CONNECTIONS, 1)
    step_aside(share, lambda: True, clock.sleep, clock)
    board.slot(1).set(scoreboard.CONNECTIONS, 0)
    step_aside(share, lambda: True, clock.sleep, clock)
    assert not share.over_share(clock.now + spread.FIRST_REST * 0.9)
    assert share.over_share(clock.now + spread.FIRST_REST)


def test_with_nothing_waiting_a_step_aside_lasts_at_most_its_limit_and_rests_nothing():
    share = AcceptSpread(serving_board(1, 0), 0)
    clock = SteppedClock()
    step_aside(share, lambda: False, clock.sleep, clock)
    assert spread.STEP_ASIDE_MAX <= clock.now - 100.0 < spread.STEP_ASIDE_MAX + 0.01
    assert share.over_share(clock.now)  # no rest: nothing was left waiting


def test_a_short_lived_connection_rests_the_rule_and_a_lasting_one_does_not():
    # A connect per task: stepping aside for each would only take a process
    # off the listener.
    share = AcceptSpread(serving_board(1, 0), 0)
    share.closed(lifetime=spread.SHORT_LIVED * 2, now=10.0)
    assert share.over_share(10.0)
    share.closed(lifetime=spread.SHORT_LIVED / 2, now=10.0)
    assert not share.over_share(10.0 + spread.SHORT_LIVED_REST * 0.9)
    assert share.over_share(10.0 + spread.SHORT_LIVED_REST)
