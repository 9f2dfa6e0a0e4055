"""Reused greenlets for a worker's tasks and connections.

A new greenlet costs an mmap and munmap of its frame stack on CPython 3.11+,
so a finished one waits, idle, for the next function to run. The pool keeps
as many as the last peak needed (at least :data:`IDLE_GREENLETS_FLOOR`) and
frees the rest at each heartbeat.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import gevent
import greenlet

log = logging.getLogger("greentask.worker")

#: Idle greenlets always kept for reuse, each about 20 KiB; above this,
#: :meth:`GreenletPool.trim_idle` frees those the last peak did not need.
IDLE_GREENLETS_FLOOR = 64


class GreenletPool:
    """Runs functions in reused greenlets; an exception is logged, never lost."""

    def __init__(self) -> None:
        self._idle: list[greenlet.greenlet] = []
        self._busy = 0
        self._peak_busy = 0
        self._loop = gevent.get_hub().loop

    def spawn(self, function: Callable[..., Any], *args: Any) -> None:
        """Run ``function(*args)`` in a reused greenlet (also the server's spawn)."""
        if self._idle:
            self._loop.run_callback(self._idle.pop().switch, function, args)
        else:
            gevent.spawn_raw(self._serve_calls, function, args)

    def _serve_calls(self, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        current = greenlet.getcurrent()
        hub = gevent.get_hub()
        while True:
            self._busy += 1
            if self._busy > self._peak_busy:
                self._peak_busy = self._busy
            try:
                function(*args)
            except Exception:
                log.exception("worker %d: unexpected error", os.getpid())
            finally:
                self._busy -= 1
            function = args = None  # type: ignore[assignment]  # no references while idle
            self._idle.append(current)
            function, args = hub.switch()

    def trim_idle(self) -> None:
        """Free the idle greenlets that the last peak did not need (each heartbeat)."""
        keep = max(IDLE_GREENLETS_FLOOR, self._peak_busy)
        self._peak_busy = self._busy
        while len(self._idle) > keep:
            gevent.kill(self._idle.pop(0))

    def kill_idle(self) -> None:
        """Free every idle greenlet (the process is stopping)."""
        idle, self._idle = self._idle, []
        for each in idle:
            gevent.kill(each)
