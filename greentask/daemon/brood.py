"""The master's children as processes: fork, signal, reap, and the two kill rules.

:class:`Brood` does what the operating system is asked about the children:
it forks them (each with a scoreboard slot), signals them, reaps the dead
(folding their counters into the census first), kills one whose event loop
stopped (SIGABRT for a traceback, SIGKILL after :data:`ABORT_GRACE`) and
one past its deadline. What to do about a death, how many children to run
and which to retire is the master's policy (:mod:`greentask.daemon.master`).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator

from gevent.monkey import get_original

from greentask.daemon import scoreboard
from greentask.daemon.census import Census
from greentask.daemon.children import ChildPhase, WorkerProcess
from greentask.daemon.lifecycle import EXIT_BOOT_ERROR, WORKER_SIGNALS

log = logging.getLogger("greentask.master")

# The master is monkey-patched (what it imports for the workers must see
# gevent) but has no gevent hub: gevent's fork would start libev child
# watchers that reap the children before the master does, and its waitpid
# would wait in a hub. So the master keeps the real calls (wakeup.py does the
# same for poll and signals). Its sockets are bound before patching.
_fork = get_original("os", "fork")
_waitpid = get_original("os", "waitpid")

#: After SIGABRT, how long a hung child gets to dump its traceback before SIGKILL.
ABORT_GRACE = 1.0

#: What a child runs once forked: ``serve(master_pid, number, slot_index)``
#: returns its exit status.
ChildMain = Callable[[int, int, int], int]


class Brood:
    """The live children by pid, and the process calls that concern them."""

    def __init__(self, board: scoreboard.Scoreboard, census: Census) -> None:
        self.board = board
        self.census = census
        #: Live children by pid.
        self.workers: dict[int, WorkerProcess] = {}
        #: Children forked so far (each child's number, for its process title).
        self.forked = 0

    def fork(self, generation: int, serve: ChildMain) -> None:
        """Fork one child of ``generation``; in the child, run ``serve`` and exit with it."""
        master_pid = os.getpid()
        slot_index = self.board.claim(generation)
        self.forked += 1
        # What the master allocated is now never scanned by a child's garbage
        # collector, which would otherwise copy every page it touches.
        gc.freeze()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        pid = _fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            self.board.slot(slot_index).set(scoreboard.PID, pid)
            now = time.monotonic()
            self.workers[pid] = WorkerProcess(pid, slot_index, generation, self.forked,
                                              started_at=now, phase_since=now)
            log.debug("started worker %d", pid)
            return
        code = EXIT_BOOT_ERROR
        try:
            code = serve(master_pid, self.forked, slot_index)
        except BaseException:
            log.exception("worker %d failed", os.getpid())
        finally:
            logging.shutdown()
            os._exit(code)

    @staticmethod
    def kill(pid: int, signum: int) -> None:
        """Send ``signum`` to ``pid``, if it still exists."""
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def signal_all(self, signum: int) -> None:
        """Send ``signum`` to every child."""
        for pid in list(self.workers):
            self.kill(pid, signum)

    def reap(self) -> Iterator[tuple[WorkerProcess, int, bool]]:
        """Each dead child: (the child, its exit code, whether it ever served).

        Its counters are in the census and its slot is free by the time it is yielded.
        """
        while True:
            try:
                pid, status = _waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            # Read before the slot is freed: a child that reached READY served.
            served = self.board.slot(worker.slot_index).state not in (
                scoreboard.BOOTING, scoreboard.FREE)
            self.census.bury(worker)
            yield worker, os.waitstatus_to_exitcode(status), served

    def watch_heartbeats(self, limit: float) -> None:
        """Kill children whose event loop has stopped running (SIGABRT, then SIGKILL)."""
        now = time.monotonic()
        for worker in list(self.workers.values()):
            if worker.phase is ChildPhase.ABORTED:
                if now - worker.phase_since > ABORT_GRACE:
                    self.kill(worker.pid, signal.SIGKILL)
                continue
            silent = now - self.board.slot(worker.slot_index).get(scoreboard.HEARTBEAT)
            if silent > limit:
                log.error("worker %d: its event loop has been blocked for %.1f s (more than "
                          "heartbeat_timeout = %g s), so a task is computing without yielding;"
                          " killing it (its traceback follows)", worker.pid, silent, limit)
                worker.enter(ChildPhase.ABORTED, now)
                self.kill(worker.pid, signal.SIGABRT)

    def kill_overdue(self, now: float, stop_deadline: float | None, retire_grace: float) -> None:
        """SIGKILL every child past ``stop_deadline``, and retired ones past their grace."""
        for worker in list(self.workers.values()):
            overdue = (stop_deadline is not None and now > stop_deadline) or \
                (worker.phase is ChildPhase.RETIRING and now - worker.phase_since > retire_grace)
            if overdue:
                log.warning("worker %d did not exit in time; killing it", worker.pid)
                self.kill(worker.pid, signal.SIGKILL)
