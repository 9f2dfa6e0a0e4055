"""Per-worker state and counters in memory shared by the master and its children.

Theory of operation
-------------------
The master maps an anonymous shared region before it forks, so every child
sees the same memory. Each child owns one slot and is the only writer of it;
the master only reads, except when it hands a free slot to a new child. A
slot is a row of doubles: an aligned 8-byte store is atomic on the platforms
greentask runs on, so no lock is needed on the hot path (a task increments
``done`` with one store).

Beside each row, a slot has a small table of task counts by function name
(for the metrics): up to :data:`MAX_FUNCTIONS` names, written once each by
the child on a function's first use (length byte last, so the master never
reads half a name), then ``ok``/``failed``/``timeout``/``cancelled`` counts
and the function's own duration histogram (for latency by function).

Worker states are :class:`~greentask.daemon.lifecycle.WorkerState`; every
change goes through :meth:`Slot.set_state`, which checks it against the
transition table.
"""

from __future__ import annotations

import bisect
import functools
import mmap
import time
from collections.abc import Callable, Collection

from greentask.daemon.activity import ActivityBoard
from greentask.daemon.lifecycle import STATE_MOVES, WorkerState, check_move

FREE, BOOTING, READY, RECYCLE, DRAINING = WorkerState

#: Upper bounds (seconds) of the task duration histogram's buckets; the last
#: bucket (above the last bound) is implicit.
#: Fine below a millisecond: most tasks offloaded to greentask end there.
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: The fields of a slot, in order.
FIELDS = ("pid", "generation", "state", "started_at", "heartbeat", "done", "failed",
          "timed_out", "cancelled", "inflight", "connections", "rss", "accepting", "duration_sum",
          *(f"duration_bucket_{i}" for i in range(len(DURATION_BUCKETS) + 1)))
_INDEX = {name: i for i, name in enumerate(FIELDS)}
PID, GENERATION, STATE, STARTED_AT, HEARTBEAT, DONE, FAILED, TIMED_OUT, CANCELLED, \
    INFLIGHT, CONNECTIONS, RSS, ACCEPTING, DURATION_SUM = range(14)
#: Index of the first duration bucket (each counts the tasks in its bucket only).
DURATION_BUCKET = 14
#: The counters that only grow while a worker lives (summed into totals when it dies).
TOTALS = (DONE, FAILED, TIMED_OUT, CANCELLED, DURATION_SUM,
          *range(DURATION_BUCKET, DURATION_BUCKET + len(DURATION_BUCKETS) + 1))


#: Task functions counted by name per worker; later ones are counted as OTHER_FUNCTION.
MAX_FUNCTIONS = 64
#: Bytes per function name in the table (a length byte, then UTF-8).
NAME_BYTES = 64
#: The name that counts every function past MAX_FUNCTIONS.
OTHER_FUNCTION = "(other)"
#: The outcomes counted per function, in the order of their counts.
OUTCOMES = (DONE, FAILED, TIMED_OUT, CANCELLED)
#: Counts per function: one per outcome, then one per duration bucket.
FUNCTION_ROW = len(OUTCOMES) + len(DURATION_BUCKETS) + 1


class Slot:
    """One worker's row; the owning child writes it, the master reads it."""

    __slots__ = ("_base", "_cells", "_counts", "_name_base", "_names", "_rows")

    def __init__(self, cells: memoryview[float], names: memoryview, counts: memoryview[float],
                 index: int) -> None:
        self._cells = cells
        self._base = index * len(FIELDS)
        self._names = names
        self._counts = counts
        self._name_base = index * MAX_FUNCTIONS
        #: The child's cache: function name -> index of its first count.
        self._rows: dict[str, int] = {}

    def get(self, field: int) -> float:
        """Read one field (a ``scoreboard`` constant such as ``DONE``)."""
        return self._cells[self._base + field]

    def set(self, field: int, value: float) -> None:
        """Write one field."""
        self._cells[self._base + field] = value

    def setter(self, field: int) -> Callable[[float], None]:
        """A function that writes one field: for a field written on every task."""
        return functools.partial(self._cells.__setitem__, self._base + field)

    def add(self, field: int, amount: float = 1) -> None:
        """Add to one field (only the owning child may: it is the only writer)."""
        self._cells[self._base + field] += amount

    @property
    def state(self) -> WorkerState:
        """The worker's state."""
        return WorkerState(int(self._cells[self._base + STATE]))

    def set_state(self, state: WorkerState) -> None:
        """Move the worker to ``state``; raises ``StateError`` for a move the table forbids."""
        check_move(STATE_MOVES, self.state, state, "a worker")
        self._cells[self._base + STATE] = state

    def observe(self, function: str, seconds: float) -> None:
        """Count one finished task of ``function`` that ran ``seconds`` in the duration
        histograms, the process's and the function's."""
        cells, base = self._cells, self._base
        bucket = bisect.bisect_left(DURATION_BUCKETS, seconds)
        cells[base + DURATION_SUM] += seconds
        cells[base + DURATION_BUCKET + bucket] += 1
        self._counts[self._row(function) + len(OUTCOMES) + bucket] += 1

    def count_task(self, function: str, outcome: int) -> None:
        """Count one finished task of ``function``; ``outcome`` is one of OUTCOMES."""
        self._cells[self._base + outcome] += 1
        row = self._rows.get(function)  # _row, inlined: this runs once per task
        if row is None:
            row = self._row(function)
        self._counts[row + outcome - DONE] += 1

    def _row(self, function: str) -> int:
        row = self._rows.get(function)
        if row is None:
            row = self._rows[function] = self._new_row(function)
        return row

    def _new_row(self, function: str) -> int:
        # The table's last entry is OTHER_FUNCTION, for every name past the others.
        written = len(set(self._rows.values()))
        name = function if written < MAX_FUNCTIONS - 1 else OTHER_FUNCTION
        if name in self._rows:
            return self._rows[name]
        entry = self._name_base + written
        encoded = name.encode()[:NAME_BYTES - 1]
        offset = entry * NAME_BYTES
        self._names[offset + 1:offset + 1 + len(encoded)] = encoded
        self._names[offset] = len(encoded)  # last: the master reads names by their length
        row = entry * FUNCTION_ROW
        self._rows[name] = row
        return row

    def functions(self) -> dict[str, list[float]]:
        """Counts by function name: ``[ok, failed, timeout, cancelled, *duration buckets]``
        (read by the master)."""
        found: dict[str, list[float]] = {}
        for entry in range(self._name_base, self._name_base + MAX_FUNCTIONS):
            offset = entry * NAME_BYTES
            length = self._names[offset]
            if not length:
                break
            name = bytes(self._names[offset + 1:offset + 1 + length]).decode(errors="replace")
            row = entry * FUNCTION_ROW
            found[name] = list(self._counts[row:row + FUNCTION_ROW])
        return found

    def clear(self) -> None:
        """Zero every field and the function table (for a new child)."""
        for field in range(len(FIELDS)):
            self._cells[self._base + field] = 0
        start = self._name_base * NAME_BYTES
        self._names[start:start + MAX_FUNCTIONS * NAME_BYTES] = bytes(MAX_FUNCTIONS * NAME_BYTES)
        start = self._name_base * FUNCTION_ROW
        for i in range(start, start + MAX_FUNCTIONS * FUNCTION_ROW):
            self._counts[i] = 0

    def beat(self) -> None:
        """Record that the worker's event loop ran just now."""
        self._cells[self._base + HEARTBEAT] = time.monotonic()

    def as_dict(self) -> dict[str, float | str]:
        """Every field by name; ``state`` as its name."""
        row: dict[str, float | str] = {name: self.get(i) for name, i in _INDEX.items()
                                       if not name.startswith("duration_bucket_")}
        row["state"] = self.state.name.lower()
        return row


def add_function_counts(into: dict[str, list[float]], counts: dict[str, list[float]]) -> None:
    """Add one worker's :meth:`Slot.functions` to running totals ``into``."""
    for name, row in counts.items():
        total = into.setdefault(name, [0.0] * FUNCTION_ROW)
        for i, count in enumerate(row):
            total[i] += count


class Scoreboard:
    """``capacity`` slots in anonymous shared memory; make it before forking."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._memory = mmap.mmap(-1, capacity * len(FIELDS) * 8)
        self._cells = memoryview(self._memory).cast("d")
        self._name_memory = mmap.mmap(-1, capacity * MAX_FUNCTIONS * NAME_BYTES)
        self._names = memoryview(self._name_memory)
        self._count_memory = mmap.mmap(-1, capacity * MAX_FUNCTIONS * FUNCTION_ROW * 8)
        self._counts = memoryview(self._count_memory).cast("d")
        # One more cell: how many slots have ever been claimed (claims take
        # the lowest free slot), so a scan stops where the used slots end.
        self._used_memory = mmap.mmap(-1, 8)
        self._used = memoryview(self._used_memory).cast("d")
        #: What each child is doing (running tasks, failures) and its cancel mailbox.
        self.activity = ActivityBoard(capacity)

    def slot(self, index: int) -> Slot:
        """The slot at ``index``."""
        return Slot(self._cells, self._names, self._counts, index)

    def indices_in(self, states: Collection[float]) -> list[int]:
        """Indices of the slots whose state is one of ``states`` (cheap: a child may ask often)."""
        cells, width = self._cells, len(FIELDS)
        return [index for index in range(int(self._used[0]))
                if cells[index * width + STATE] in states]

    def claim(self, generation: int) -> int:
        """Give a free slot to a child about to be forked; return its index.

        Raises ``RuntimeError`` when every slot is taken.
        """
        for index in range(self.capacity):
            slot = self.slot(index)
            if slot.state == FREE:
                slot.clear()
                self.activity.clear(index)
                now = time.monotonic()
                slot.set(GENERATION, generation)
                slot.set(STARTED_AT, now)
                slot.set(HEARTBEAT, now)
                slot.set_state(BOOTING)
                self._used[0] = max(self._used[0], index + 1)
                return index
        raise RuntimeError(f"all {self.capacity} worker slots are in use")

    def release(self, index: int) -> None:
        """Free the slot of a child that has been reaped."""
        self.slot(index).set_state(FREE)
