"""Spreading connections over the worker processes that share one listener.

Theory of operation
-------------------
Every process waiting on the shared listener is woken by a new connection
and the first to call ``accept`` wins, so one process often takes all of a
client's connections (a third of the time with two processes, here): a
reload, a recycle or one CPU-bound task then hits all of that caller's work
at once. SO_REUSEPORT would spread them, but it drops the queued connections
of a socket that closes, which breaks zero-loss reloads.

So each process, after it accepts, compares its open connections with those
of its siblings that are accepting (their scoreboard slots). One holding
more than its share (the fewest any of them holds, plus a quarter) *steps
aside*: it stops accepting until a sibling has caught up, or a connection
waits that no sibling takes (they are busy: taking it beats leaving it
queued), or :data:`STEP_ASIDE_MAX` passes. A process never defers to one
that is not accepting (aside itself, or full), so one of them always
accepts.

Where a connection lands matters only if it stays. Connections that last
one task each (a connect per task, health checks) come and go faster than
any count settles, and stepping aside for them would only take a process
off the listener (connect-per-task throughput fell to 0.6 of what it was).
So a connection that closes within :data:`SHORT_LIVED` of its accept turns
the rule off for :data:`SHORT_LIVED_REST`: under such traffic it never
runs. A step aside that did not help (a connection
waited and no sibling took it) turns the rule off for a rest that doubles
each time it happens again (from :data:`FIRST_REST` to :data:`LONGEST_REST`)
and starts over once a step aside works: a sibling stuck in a CPU-bound task
costs new clients one short wait now and then, and a sibling that was only
slow to wake (a loaded machine) costs a tenth of a second of balance.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from greentask.daemon import scoreboard

#: Longest time a process stays aside in one go (seconds).
STEP_ASIDE_MAX = 0.05
#: How often a process that stepped aside looks again (seconds).
LOOK_INTERVAL = 0.005
#: How long a connection may wait unclaimed before the process takes it back (seconds).
UNCLAIMED_WAIT = 0.02
#: A connection closed this soon after its accept is short-lived (seconds)...
SHORT_LIVED = 0.05
#: ... and the rule rests this long after one closes (seconds).
SHORT_LIVED_REST = 0.1
#: The rule rests this long after a step aside that did not help (seconds)...
FIRST_REST = 0.1
#: ... twice as long after each further one, up to this.
LONGEST_REST = 2.0
_SERVING = (float(scoreboard.READY), float(scoreboard.RECYCLE))
_ACCEPTING, _CONNECTIONS = scoreboard.ACCEPTING, scoreboard.CONNECTIONS


class AcceptSpread:
    """Whether this process should leave the next connection to a sibling."""

    def __init__(self, board: scoreboard.Scoreboard, own_index: int) -> None:
        self._board = board
        self._own = board.slot(own_index)
        self._own_index = own_index
        self._off_until = float("-inf")
        self._rest = FIRST_REST

    def over_share(self, now: float) -> bool:
        """True when this process holds more connections than its share and should step aside."""
        if now < self._off_until:
            return False
        fewest = None
        for index in self._board.indices_in(_SERVING):
            sibling = self._board.slot(index)
            if index != self._own_index and sibling.get(_ACCEPTING):
                count = sibling.get(_CONNECTIONS)
                if fewest is None or count < fewest:
                    fewest = count
        return fewest is not None and self._own.get(_CONNECTIONS) > fewest + fewest // 4

    def closed(self, lifetime: float, now: float) -> None:
        """A connection that lasted ``lifetime`` seconds closed."""
        if lifetime < SHORT_LIVED:
            self._off_until = max(self._off_until, now + SHORT_LIVED_REST)

    def helped(self) -> None:
        """A sibling took its share while this process stood aside."""
        self._rest = FIRST_REST

    def did_not_help(self, now: float) -> None:
        """A connection waited and no sibling took it: accept freely for a while."""
        self._off_until = now + self._rest
        self._rest = min(self._rest * 2, LONGEST_REST)


def step_aside(spread: AcceptSpread, connection_waiting: Callable[[], bool],
               sleep: Callable[[float], object],
               clock: Callable[[], float] = time.monotonic) -> None:
    """Wait while this process should leave new connections to its siblings.

    ``connection_waiting()`` says whether a connection is queued on the
    listener; ``sleep(seconds)`` yields to the event loop.
    """
    started = clock()
    waiting_since: float | None = None
    while True:
        sleep(LOOK_INTERVAL)
        now = clock()
        if not spread.over_share(now):
            spread.helped()
            return
        if now - started >= STEP_ASIDE_MAX:
            return
        if not connection_waiting():
            waiting_since = None
        elif waiting_since is None:
            waiting_since = now
        elif now - waiting_since >= UNCLAIMED_WAIT:
            spread.did_not_help(now)
            return

