"""What the master counts about its children: live rows, and totals that never go back.

A child's counters live in its scoreboard slot while it runs. When it exits,
:meth:`Census.bury` adds them to the totals before the slot is freed, so
``status`` and the metrics never go backwards. Both read through
:func:`fold`, the one place a slot's counters are added up.

What the dashboard adds to ``status`` (the running tasks, the last failures,
counts and durations by function) comes from the children's activity
documents (:mod:`greentask.daemon.activity`) and the scoreboard.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from typing import Any

from greentask.daemon import scoreboard
from greentask.daemon.activity import FAILURES_KEPT, RUNNING_SHOWN
from greentask.daemon.children import WorkerProcess

#: Seconds over which ``status`` measures each child's tasks per second.
RATE_WINDOW = 5.0
#: Why a worker was replaced (the metrics' ``cause`` label): it died, its loop
#: stopped (the watchdog), it could not start, or it was retired.
RESTART_CAUSES = ("crash", "watchdog", "boot", "reload", "recycle", "scale", "failed reload")
#: The outcome counts by function in ``status``, named as the slot's fields are.
OUTCOME_NAMES = tuple(scoreboard.FIELDS[outcome] for outcome in scoreboard.OUTCOMES)
#: The slot fields ``status`` shows for each child, as whole numbers.
STATUS_FIELDS = ("rss", "connections", "inflight", "done", "failed", "timed_out",
                 "cancelled")


def fold(slot: scoreboard.Slot, totals: list[float],
         functions: dict[str, list[float]]) -> None:
    """Add ``slot``'s growing counters to ``totals``, its counts by function to ``functions``."""
    for field in scoreboard.TOTALS:
        totals[field] += slot.get(field)
    scoreboard.add_function_counts(functions, slot.functions())


class Census:
    """The children's counters: those of the exited ones, and a view of the live ones."""

    def __init__(self, board: scoreboard.Scoreboard) -> None:
        self.board = board
        #: Counters of workers that have exited.
        self.totals = [0.0] * len(scoreboard.FIELDS)
        #: Task counts by function of the workers that exited: [ok, failed, timeout,
        #: cancelled, *duration buckets].
        self.function_totals: dict[str, list[float]] = {}
        #: Workers replaced, by cause; every cause from 0, so a dashboard sees it at once.
        self.restarts: collections.Counter[str] = collections.Counter(
            dict.fromkeys(RESTART_CAUSES, 0))
        #: The last failures of workers that exited, newest last.
        self.failures: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=FAILURES_KEPT)

    def bury(self, worker: WorkerProcess) -> None:
        """Keep an exited child's counters, and free its slot."""
        fold(self.board.slot(worker.slot_index), self.totals, self.function_totals)
        self.failures.extend(self._failures_in(worker, self._activity_of(worker)))
        self.board.release(worker.slot_index)

    def _activity_of(self, worker: WorkerProcess) -> dict[str, Any]:
        # While the child writes, its last document read stands in.
        document = self.board.activity.read(worker.slot_index)
        if document is not None:
            worker.activity = document
        return worker.activity or {}

    @staticmethod
    def _failures_in(worker: WorkerProcess, document: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"pid": worker.pid, **failure} for failure in document.get("failures", ())]

    def activity(self, workers: Iterable[WorkerProcess]) -> dict[str, Any]:
        """The oldest running tasks of all live children, the last failures (of exited
        children too), and task counts and durations by function, for ``status``."""
        now = time.monotonic()
        running, failures = [], list(self.failures)
        workers = list(workers)
        for worker in workers:
            document = self._activity_of(worker)
            stale = now - document.get("at", now)
            running.extend({"pid": worker.pid, **task, "age": task["age"] + stale}
                           for task in document.get("running", ()))
            failures.extend(self._failures_in(worker, document))
        running.sort(key=lambda task: -task["age"])
        failures.sort(key=lambda failure: -failure["at"])
        _, _, functions = self.snapshot(workers)
        outcomes = len(scoreboard.OUTCOMES)
        return {"running": running[:RUNNING_SHOWN], "failures": failures[:FAILURES_KEPT],
                "duration_bounds": list(scoreboard.DURATION_BUCKETS),
                "functions": {name: {**{label: int(count) for label, count in zip(
                    OUTCOME_NAMES, row[:outcomes], strict=True)},
                    "durations": [int(count) for count in row[outcomes:]]}
                    for name, row in sorted(functions.items())}}

    def worker_rows(self, workers: Iterable[WorkerProcess]) -> list[dict[str, Any]]:
        """Each live child's state and counters, for ``status``."""
        now = time.monotonic()
        rows = []
        for worker in sorted(workers, key=lambda w: w.number):
            row = self.board.slot(worker.slot_index).as_dict()
            then, done_then = worker.rate_sample
            rate = (row["done"] - done_then) / (now - then) if then else 0.0
            if now - then > RATE_WINDOW:
                worker.rate_sample = (now, row["done"])
            rows.append({
                "pid": worker.pid, "number": worker.number, "generation": worker.generation,
                "state": row["state"], "retiring": worker.retired,
                "uptime": now - worker.started_at, "heartbeat_age": now - row["heartbeat"],
                "tasks_per_second": rate,
                **{field: int(row[field]) for field in STATUS_FIELDS}})
        return rows

    def snapshot(self, workers: Iterable[WorkerProcess], known_functions: Iterable[str] = ()
                 ) -> tuple[list[float], list[dict[str, object]], dict[str, list[float]]]:
        """Totals (exited plus live), per-child gauges, counts by function, for the metrics.

        Every name of ``known_functions`` has counts, zeros until it runs, so
        dashboards and alerts see each task before its first call.
        """
        totals = list(self.totals)
        functions = {name: [0.0] * scoreboard.FUNCTION_ROW for name in known_functions}
        functions.update((name, list(counts)) for name, counts in self.function_totals.items())
        rows: list[dict[str, object]] = []
        for worker in workers:
            slot = self.board.slot(worker.slot_index)
            fold(slot, totals, functions)
            rows.append({"pid": worker.pid, **{name: slot.get(field) for name, field in (
                ("inflight", scoreboard.INFLIGHT), ("connections", scoreboard.CONNECTIONS),
                ("rss", scoreboard.RSS))}})
        return totals, rows, functions
