"""Small tasks for trying greentask out, for tests and for benchmarks."""

from __future__ import annotations

import time
from typing import Any

from greentask.registry import task


@task
def echo(*args: Any, **kwargs: Any) -> Any:
    """Return the keyword arguments as an object, or the positional ones as an array."""
    return kwargs if kwargs else list(args)


@task
def sleep(seconds: float) -> float:
    """Wait ``seconds`` without blocking the process (time.sleep is monkey-patched)."""
    time.sleep(seconds)
    return seconds


@task
def fail(message: str = "failed on purpose") -> None:
    """Raise ``RuntimeError(message)``: shows how a task's exception comes back."""
    raise RuntimeError(message)


@task
def cpu(n: int) -> int:
    """Burn CPU for ``n`` loop turns without yielding; returns a checksum."""
    total = 0
    for i in range(n):
        total = (total + i * i) % 1_000_003
    return total
