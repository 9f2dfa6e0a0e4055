"""Task deadlines: two small strategies with one shape, after rq's death penalty.

Each throws an :class:`Expired` naming the run it is for into the task when
its time is up, so the runner can tell its deadline from any other exception
(a nested timeout of the task's own). Limits under :data:`COARSE_TIMEOUT_MIN`
get a timer of their own (:class:`TimerDeadline`); longer ones are checked by
the :class:`DeadlineSweep` every :data:`DEADLINE_SWEEP_INTERVAL`, against the
runner's table of running tasks: nothing per task at all. A cancelled task
has a deadline too: :class:`CancelOverdue` ends one still running
``cancel_grace`` seconds later.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

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
    so a task's ``except Exception`` does not swallow it). ``run`` is the running
    task's entry it was meant for: another task's, or another run's, is not this one's."""

    def __init__(self, run: object) -> None:
        super().__init__()
        self.run = run


class TimerDeadline:
    """A limit with a timer of its own: for short limits, where the sweep is too coarse."""

    __slots__ = ("_timeout",)

    def __init__(self, seconds: float, run: object) -> None:
        self._timeout = gevent.Timeout(seconds, Expired(run))
        self._timeout.start()

    def cancel(self) -> None:
        """The task ended in time."""
        self._timeout.close()


class DeadlineSweep:
    """The timer that expires the running tasks with a long limit.

    It reads the runner's table of running tasks itself, so a task with a long
    limit costs nothing per task: its deadline is worked out at each sweep.
    """

    def __init__(self, running: Mapping[greenlet.greenlet, Any],
                 deadline_of: Callable[[Any], float | None],
                 interval: float = DEADLINE_SWEEP_INTERVAL) -> None:
        self._running = running
        #: A running task's deadline, or None when a timer of its own enforces it.
        self._deadline_of = deadline_of
        self._timer = gevent.get_hub().loop.timer(interval, interval)

    def start(self) -> None:
        """Check the deadlines every interval, from the event loop."""
        self._timer.start(self._expire)

    def stop(self) -> None:
        """Stop checking."""
        self._timer.stop()

    def _expire(self) -> None:
        # Runs in the hub, like gevent.Timeout's own timers: every task listed
        # is suspended inside its task, so the throw lands there (once per
        # sweep, until it ends: a task that catches it is told again).
        now = time.monotonic()
        for task_greenlet, run in list(self._running.items()):
            deadline = self._deadline_of(run)
            if deadline is not None and now >= deadline and \
                    self._running.get(task_greenlet) is run:
                task_greenlet.throw(Expired(run))
