"""Waiters: a wait that the hot path pays for only while someone waits."""

import gevent

from greentask.daemon.waiters import Waiters


def test_each_waiter_wakes_when_its_own_condition_holds():
    waiters, count, woken = Waiters(), [0], []

    def wait_for(value):
        assert waiters.wait_until(lambda: count[0] >= value, timeout=5)
        woken.append(value)

    greenlets = [gevent.spawn(wait_for, value) for value in (2, 1)]
    gevent.sleep(0)
    assert waiters.anyone and not woken
    for _ in range(2):
        count[0] += 1
        waiters.wake()
        gevent.sleep(0)
        gevent.sleep(0)
    gevent.joinall(greenlets, timeout=5, raise_error=True)
    assert woken == [1, 2]
    assert not waiters.anyone  # the last wake-up found nobody waiting again


def test_a_condition_already_true_does_not_wait_and_a_timeout_says_false():
    waiters = Waiters()
    assert waiters.wait_until(lambda: True)
    assert not waiters.anyone
    assert waiters.wait_until(lambda: False, timeout=0.01) is False
