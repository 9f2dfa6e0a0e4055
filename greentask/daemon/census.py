"""What the master counts about its children: live rows, and totals that never go back.

A child's counters live in its scoreboard slot while it runs. When it exits,
:meth:`Census.bury` adds them to the totals before the slot is freed, so
``status`` and the metrics never go backwards. Both read through
:func:`fold`, the one place a slot's counters are added up.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from typing import Any

from greentask.daemon import scoreboard
from greentask.daemon.children import WorkerProcess

#: Seconds over which ``status`` measures each child's tasks per second.
RATE_WINDOW = 5.0
#: The slot fields ``status`` shows for each child, as whole numbers.
#: Why a worker was replaced (the metrics' ``cause`` label): it died, its loop
#: stopped (the watchdog), it could not start, or it was retired.
RESTART_CAUSES = ("crash", "watchdog", "boot", "reload", "recycle", "scale", "failed reload")
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
        #: cancelled].
        self.function_totals: dict[str, list[float]] = {}
        #: Workers replaced, by cause; every cause from 0, so a dashboard sees it at once.
        self.restarts: collections.Counter[str] = collections.Counter(
            dict.fromkeys(RESTART_CAUSES, 0))

    def bury(self, worker: WorkerProcess) -> None:
        """Keep an exited child's counters, and free its slot."""
        fold(self.board.slot(worker.slot_index), self.totals, self.function_totals)
        self.board.release(worker.slot_index)

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
        functions = {name: [0.0] * len(scoreboard.OUTCOMES) for name in known_functions}
        functions.update((name, list(counts)) for name, counts in self.function_totals.items())
        rows: list[dict[str, object]] = []
        for worker in workers:
            slot = self.board.slot(worker.slot_index)
            fold(slot, totals, functions)
            rows.append({"pid": worker.pid, **{name: slot.get(field) for name, field in (
                ("inflight", scoreboard.INFLIGHT), ("connections", scoreboard.CONNECTIONS),
                ("rss", scoreboard.RSS))}})
        return totals, rows, functions
