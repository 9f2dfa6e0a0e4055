"""What the master and its workers agree on: signals, exit statuses, worker states.

A leaf: standard library only, so both sides import it without importing each
other. A worker's state lives in its scoreboard slot; every change goes
through :func:`check_move`, as supervisor's process states do.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Collection, Mapping
from typing import TypeVar

#: Signals a worker handles (stop gracefully, stop now, reopen logs). The
#: master blocks them across the fork and the worker unblocks them once its
#: handlers are in place, so one sent to a booting worker waits instead of
#: hitting the handler it inherited from the master, which would drop it.
WORKER_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1})
#: Exit status: stopped as asked.
EXIT_OK = 0
#: Exit status: the config, a flag or the address is wrong (argparse uses 2 too).
EXIT_CONFIG = 2
#: Exit status: workers cannot start (a task module does not import).
EXIT_BOOT_ERROR = 3


class WorkerState(enum.IntEnum):
    """A worker's state, as its scoreboard slot stores it (a number, shared memory)."""

    #: The slot is free: no child has it.
    FREE = 0
    #: Forked, importing task modules; not serving yet.
    BOOTING = 1
    #: Serving the listener.
    READY = 2
    #: Wants to be replaced (served enough tasks, or grew too big); still serving.
    RECYCLE = 3
    #: Told to stop: not accepting, finishing in-flight tasks.
    DRAINING = 4


#: The states each state may move to. Any slot goes back to FREE when the
#: master reaps its child, whatever the child was doing.
STATE_MOVES: dict[WorkerState, frozenset[WorkerState]] = {
    WorkerState.FREE: frozenset({WorkerState.BOOTING}),
    WorkerState.BOOTING: frozenset({WorkerState.READY, WorkerState.DRAINING, WorkerState.FREE}),
    WorkerState.READY: frozenset({WorkerState.RECYCLE, WorkerState.DRAINING, WorkerState.FREE}),
    WorkerState.RECYCLE: frozenset({WorkerState.DRAINING, WorkerState.FREE}),
    WorkerState.DRAINING: frozenset({WorkerState.FREE}),
}


class StateError(AssertionError):
    """A state change that the table does not allow: a bug in greentask, not in a peer."""


State = TypeVar("State", bound=enum.Enum)


def check_move(moves: Mapping[State, Collection[State]], old: State, new: State,
               subject: str) -> None:
    """Raise :class:`StateError` unless ``subject`` may move from ``old`` to ``new``.

    Every state machine of the daemon checks its moves here: a worker's
    state (:data:`STATE_MOVES`), the master's view of a child, a connection.
    """
    if new not in moves[old]:
        raise StateError(f"{subject} cannot move from {_state_name(old)} to "
                         f"{_state_name(new)}")


def _state_name(state: enum.Enum) -> str:
    return state.value if isinstance(state.value, str) else state.name.lower()


def processes_text(count: int) -> str:
    """``1 worker process``, ``2 worker processes``: for logs and command output."""
    return f"{count} worker process{'' if count == 1 else 'es'}"


def set_process_title(title: str) -> None:
    """Show ``title`` in ps and top, when setproctitle is installed."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(title)
