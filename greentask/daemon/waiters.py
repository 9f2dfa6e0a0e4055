"""A wait that costs nothing until someone waits: for conditions the hot path changes.

The runner and each connection change their counts of running tasks on every
task, but almost never has anyone waiting for a count to reach a value (a
drain waits for no task, a peer at its in-flight limit for one fewer). An
``Event`` kept true to the count costs a ``set`` and a ``clear`` per task;
:class:`Waiters` costs the hot path one attribute test (:attr:`Waiters.anyone`)
and makes its event only for a waiter, who checks its condition again after
each wake-up, as with a condition variable.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gevent.event import Event


class Waiters:
    """Greenlets waiting for a condition; the side that changes it calls :meth:`wake`."""

    __slots__ = ("_event", "anyone")

    def __init__(self) -> None:
        #: True while a greenlet waits: test it before calling :meth:`wake`.
        self.anyone = False
        self._event: Event | None = None

    def wait_until(self, condition: Callable[[], bool], timeout: float | None = None) -> bool:
        """Block until ``condition()`` is true (checked at each :meth:`wake`);
        False when ``timeout`` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not condition():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            if self._event is None:
                self._event = Event()
            self.anyone = True
            self._event.wait(remaining)
        return True

    def wake(self) -> None:
        """The condition may have changed: every waiter checks its own again."""
        event, self._event, self.anyone = self._event, None, False
        if event is not None:
            event.set()
