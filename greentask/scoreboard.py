"""Per-worker state and counters in memory shared by the master and its children.

Theory of operation
-------------------
The master maps an anonymous shared region before it forks, so every child
sees the same memory. Each child owns one slot and is the only writer of it;
the master only reads, except when it hands a free slot to a new child. A
slot is a row of doubles: an aligned 8-byte store is atomic on the platforms
greentask runs on, so no lock is needed on the hot path (a task increments
``done`` with one store).

Worker states are the constants below; a child changes its own state only
through :meth:`Slot.set_state`.
"""

from __future__ import annotations

import bisect
import mmap
import time

#: The slot is free.
FREE = 0
#: Forked, importing task modules; not serving yet.
BOOTING = 1
#: Serving the listener.
READY = 2
#: Wants to be replaced (served enough tasks, or grew too big); still serving.
RECYCLE = 3
#: Told to stop: not accepting, finishing in-flight tasks.
DRAINING = 4

STATE_NAMES = {FREE: "free", BOOTING: "booting", READY: "ready", RECYCLE: "recycle",
               DRAINING: "draining"}

#: Upper bounds (seconds) of the task duration histogram's buckets; the last
#: bucket (above the last bound) is implicit.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)

#: The fields of a slot, in order.
FIELDS = ("pid", "generation", "state", "started_at", "heartbeat", "done", "failed",
          "timed_out", "inflight", "connections", "rss", "duration_sum",
          *(f"duration_bucket_{i}" for i in range(len(DURATION_BUCKETS) + 1)))
_INDEX = {name: i for i, name in enumerate(FIELDS)}
PID, GENERATION, STATE, STARTED_AT, HEARTBEAT, DONE, FAILED, TIMED_OUT, INFLIGHT, \
    CONNECTIONS, RSS, DURATION_SUM = range(12)
#: Index of the first duration bucket (each counts the tasks in its bucket only).
DURATION_BUCKET = 12
#: The counters that only grow while a worker lives (summed into totals when it dies).
TOTALS = (DONE, FAILED, TIMED_OUT, DURATION_SUM,
          *range(DURATION_BUCKET, DURATION_BUCKET + len(DURATION_BUCKETS) + 1))


class Slot:
    """One worker's row; the owning child writes it, the master reads it."""

    __slots__ = ("_base", "_cells")

    def __init__(self, cells: memoryview, index: int) -> None:
        self._cells = cells
        self._base = index * len(FIELDS)

    def get(self, field: int) -> float:
        """Read one field (a ``scoreboard`` constant such as ``DONE``)."""
        return self._cells[self._base + field]

    def set(self, field: int, value: float) -> None:
        """Write one field."""
        self._cells[self._base + field] = value

    def add(self, field: int, amount: float = 1) -> None:
        """Add to one field (only the owning child may: it is the only writer)."""
        self._cells[self._base + field] += amount

    @property
    def state(self) -> int:
        """The worker's state constant."""
        return int(self._cells[self._base + STATE])

    def set_state(self, state: int) -> None:
        """Move the worker to ``state`` (one of the module's state constants)."""
        self._cells[self._base + STATE] = state

    def observe(self, seconds: float) -> None:
        """Count one finished task of ``seconds`` in the duration histogram."""
        cells, base = self._cells, self._base
        cells[base + DURATION_SUM] += seconds
        cells[base + DURATION_BUCKET + bisect.bisect_left(DURATION_BUCKETS, seconds)] += 1

    def beat(self) -> None:
        """Record that the worker's event loop ran just now."""
        self._cells[self._base + HEARTBEAT] = time.monotonic()

    def as_dict(self) -> dict[str, float | str]:
        """Every field by name; ``state`` as its name."""
        row: dict[str, float | str] = {name: self.get(i) for name, i in _INDEX.items()
                                       if not name.startswith("duration_bucket_")}
        row["state"] = STATE_NAMES.get(self.state, "unknown")
        return row


class Scoreboard:
    """``capacity`` slots in anonymous shared memory; make it before forking."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._memory = mmap.mmap(-1, capacity * len(FIELDS) * 8)
        self._cells = memoryview(self._memory).cast("d")

    def slot(self, index: int) -> Slot:
        """The slot at ``index``."""
        return Slot(self._cells, index)

    def claim(self, generation: int) -> int:
        """Give a free slot to a child about to be forked; return its index.

        Raises ``RuntimeError`` when every slot is taken.
        """
        for index in range(self.capacity):
            slot = self.slot(index)
            if slot.state == FREE:
                for field in range(len(FIELDS)):
                    slot.set(field, 0)
                now = time.monotonic()
                slot.set(GENERATION, generation)
                slot.set(STARTED_AT, now)
                slot.set(HEARTBEAT, now)
                slot.set_state(BOOTING)
                return index
        raise RuntimeError(f"all {self.capacity} worker slots are in use")

    def release(self, index: int) -> None:
        """Free the slot of a child that has been reaped."""
        self.slot(index).set_state(FREE)
