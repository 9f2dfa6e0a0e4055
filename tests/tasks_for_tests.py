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


@task
def cleans_up(seconds: float) -> int:
    """Sleeps; cancelled, reports how far it got."""
    from greentask import Cancelled
    started = time.monotonic()
    try:
        time.sleep(seconds)
    except Cancelled:
        raise Cancelled(result={"slept": round(time.monotonic() - started, 1),
                                "cleaned": True}) from None
    return 0


@task
def ignores_cancel(seconds: float) -> str:
    """Catches the cancellation and goes on sleeping: killed after cancel_grace."""
    from greentask import Cancelled
    try:
        time.sleep(seconds)
    except Cancelled:
        time.sleep(seconds)
    return "never"


@task
def returns_when_cancelled(seconds: float) -> str:
    """Catches the cancellation and returns: what it returns is the cancelled result."""
    from greentask import Cancelled
    try:
        time.sleep(seconds)
    except Cancelled:
        return "stopped early"
    return "done"


@task
def busy_with_progress(steps: int) -> int:
    """Computes between progress() calls without any other switch."""
    for step in range(steps):
        sum(range(20_000))
        progress({"step": step})
    return steps


@task
def outlives_its_timeout(seconds: float) -> str:
    """Swallows the server's timeout and sleeps on: only a cancel ends it."""
    try:
        time.sleep(seconds)
    except BaseException:  # on purpose: a task that ignores its deadline
        time.sleep(seconds)
    return "late"


@task
def floods_progress(count: int, size: int) -> int:
    """Reports ``count`` progress values of ``size`` bytes each, as fast as the
    connection takes them (progress() yields)."""
    blob = "x" * size
    for step in range(count):
        progress({"step": step, "blob": blob})
    return count


@task
def spins_until_exists(path: str, give_up_after: float = 120.0) -> str:
    """Burns CPU without yielding until ``path`` exists (a hog the test releases, however
    slow the machine); gives up after ``give_up_after`` seconds."""
    deadline = time.monotonic() + give_up_after
    while not os.path.exists(path):  # a stat: no greenlet switch
        if time.monotonic() > deadline:
            return "gave up"
    return path


@task
def until_exists(path: str) -> str:
    """Runs until ``path`` exists: a test says when, however long it takes to set up."""
    while not os.path.exists(path):
        time.sleep(0.5)
    return path
