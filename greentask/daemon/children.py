"""What the master knows about each child, the one place a child's phase changes,
and the guard against children that never start."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any

from greentask.daemon.lifecycle import EXIT_BOOT_ERROR, check_move


class ChildPhase(enum.Enum):
    """Where a child is, as the master sees it (the child's own state is in its slot)."""

    #: Serving, as far as the master knows.
    SERVING = "serving"
    #: Sent SIGTERM: it drains, then exits.
    RETIRING = "retiring"
    #: Its event loop stopped: sent SIGABRT (a traceback), SIGKILL after a grace.
    ABORTED = "aborted"


#: The phases each phase may move to.
CHILD_MOVES: dict[ChildPhase, frozenset[ChildPhase]] = {
    ChildPhase.SERVING: frozenset({ChildPhase.RETIRING, ChildPhase.ABORTED}),
    ChildPhase.RETIRING: frozenset({ChildPhase.ABORTED}),
    ChildPhase.ABORTED: frozenset(),
}


@dataclass
class WorkerProcess:
    """One child of the master."""

    pid: int
    #: Its row in the scoreboard.
    slot_index: int
    generation: int
    number: int
    started_at: float
    phase: ChildPhase = ChildPhase.SERVING
    #: When it entered its phase.
    phase_since: float = 0.0
    #: Why it was retired (reload, recycle, scale, failed reload), for the restart
    #: metrics; empty while it was never retired.
    retire_cause: str = ""
    #: (time, tasks done) a few seconds ago, for the tasks/s of ``status``.
    rate_sample: tuple[float, float] = (0.0, 0.0)
    #: Its last activity document (running tasks, failures) read from the board.
    activity: dict[str, Any] | None = None

    @property
    def retired(self) -> bool:
        """True once the master told it to drain (even if the watchdog then aborted it)."""
        return bool(self.retire_cause)

    def restart_cause(self, code: int) -> str:
        """Why it is being replaced, for the metrics: why it was retired, else how it died."""
        return self.retire_cause or ("watchdog" if self.phase is ChildPhase.ABORTED else
                                     "boot" if code == EXIT_BOOT_ERROR else "crash")

    def enter(self, phase: ChildPhase, now: float | None = None) -> None:
        """Move to ``phase``; raises ``StateError`` for a move the table forbids."""
        check_move(CHILD_MOVES, self.phase, phase, f"worker {self.pid}")
        self.phase = phase
        self.phase_since = time.monotonic() if now is None else now

    def retire(self, cause: str) -> None:
        """Record that it was told to drain, and why (an aborted child stays aborted)."""
        self.retire_cause = cause
        if self.phase is ChildPhase.SERVING:
            self.enter(ChildPhase.RETIRING)


#: Children in a row that may die before they ever serve, before the master
#: gives up (status 3).
MAX_FAILED_STARTS = 10
#: Longest wait before restarting a child that keeps dying before it serves (seconds).
MAX_RESPAWN_DELAY = 5.0


class StartGuard:
    """Children that die before they ever serve: a growing delay before the next start,
    and after :data:`MAX_FAILED_STARTS` in a row, give up (a boot loop, not bad luck)."""

    def __init__(self) -> None:
        #: Children in a row that died before they served.
        self.failed = 0
        self._respawn_at = 0.0

    def may_start(self, now: float) -> bool:
        """False while the delay after a failed start runs."""
        return now >= self._respawn_at

    def served(self) -> None:
        """A child that served died (killed from outside, however young): no boot loop."""
        self.failed = 0

    def failed_start(self, now: float) -> float | None:
        """Count a child that died before it served; the delay before the next start, or
        None when the master should give up."""
        self.failed += 1
        if self.failed >= MAX_FAILED_STARTS:
            return None
        delay = min(0.1 * 2 ** self.failed, MAX_RESPAWN_DELAY)
        self._respawn_at = now + delay
        return delay
