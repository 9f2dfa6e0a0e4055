"""Task deadlines: two small strategies with one shape, after rq's death penalty.

Each throws its own :class:`Expired` into the task when its time is up, so
the runner can tell its deadline from any other exception (a nested
timeout of the task's own). Limits under :data:`COARSE_TIMEOUT_MIN` get a
timer of their own (:class:`TimerDeadline`); longer ones are an entry in the
:class:`DeadlineSweep`, checked every :data:`DEADLINE_SWEEP_INTERVAL`, which
saves about a microsecond per task. A cancelled task has a deadline too:
:class:`CancelOverdue` ends one still running ``cancel_grace`` seconds later.
"""

from __future__ import annotations

import time

import gevent
import greenlet

#: Task limits at least this long are enforced by the sweep instead of a
#: timer per task (seconds).
COARSE_TIMEOUT_MIN = 2.0
#: How often the sweep checks running tasks against their deadline (seconds).
DEADLINE_SWEEP_INTERVAL = 0.25


class CancelOverdue(BaseException):
    """Thrown into a cancelled task still running after ``cancel_grace``: it ends now
    (a BaseException, so the task's ``except Exception`` does not keep it alive)."""


class Expired(BaseException):
    """Thrown into a task past its deadline (a BaseException, like ``gevent.Timeout``,
    so a task's ``except Exception`` does not swallow it)."""


class TimerDeadline:
    """A limit with a timer of its own: for short limits, where the sweep is too coarse."""

    __slots__ = ("_timeout", "expired")

    def __init__(self, seconds: float) -> None:
        self.expired = Expired()
        self._timeout = gevent.Timeout(seconds, self.expired)
        self._timeout.start()

    def cancel(self) -> None:
        """The task ended in time."""
        self._timeout.close()


class DeadlineSweep:
    """Running tasks with a long limit, and the timer that expires them."""

    def __init__(self, interval: float = DEADLINE_SWEEP_INTERVAL) -> None:
        #: Task greenlet -> (deadline, what to throw into it); the runner adds
        #: and removes a task's entry itself (no object per task on this path).
        self.deadlines: dict[greenlet.greenlet, tuple[float, Expired]] = {}
        self._timer = gevent.get_hub().loop.timer(interval, interval)

    def start(self) -> None:
        """Check the deadlines every interval, from the event loop."""
        self._timer.start(self._expire)

    def stop(self) -> None:
        """Stop checking."""
        self._timer.stop()

    def _expire(self) -> None:
        # Runs in the hub, like gevent.Timeout's own timers: every task listed
        # is suspended inside its task, so the throw lands there.
        now = time.monotonic()
        for task_greenlet, (deadline, expired) in list(self.deadlines.items()):
            if now >= deadline and self.deadlines.get(task_greenlet, (0, None))[1] is expired:
                task_greenlet.throw(expired)
