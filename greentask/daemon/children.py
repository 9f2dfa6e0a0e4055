"""What the master knows about each child, and the one place a child's phase changes."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from greentask.daemon.lifecycle import check_move


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

    @property
    def retired(self) -> bool:
        """True once the master told it to drain (even if the watchdog then aborted it)."""
        return bool(self.retire_cause)

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
