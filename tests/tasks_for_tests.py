"""Tasks that only the tests use (imported by the test daemons' [worker] tasks)."""

from __future__ import annotations

import os
import time

from greentask import progress, task


@task
def pid() -> int:
    """The pid of the worker process that ran this."""
    return os.getpid()


@task
def not_json() -> object:
    return object()


@task
def exits() -> None:
    raise SystemExit(3)


@task(name="steps.count")
def count_steps(n: int, delay: float = 0.0) -> int:
    for i in range(1, n + 1):
        progress({"step": i})
        time.sleep(delay)
    return n


@task
def bad_progress() -> str:
    progress(object())
    return "unreachable"


_held: list[bytes] = []


@task
def hold_memory(megabytes: int) -> int:
    """Keep ``megabytes`` of written (resident) memory until the process exits."""
    _held.append(b"x" * (megabytes * 1024 * 1024))
    return len(_held)


_running = 0
_peak = 0


@task
def gauge(seconds: float) -> int:
    """Sleep; return the most tasks of this process seen running at once so far."""
    global _running, _peak
    _running += 1
    _peak = max(_peak, _running)
    try:
        time.sleep(seconds)
    finally:
        _running -= 1
    return _peak
