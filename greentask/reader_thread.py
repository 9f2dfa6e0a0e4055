"""Reader threads that leave the process's signals to its main thread."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

#: Signals a reader thread never takes. The kernel hands a process's signal to
#: any thread that does not block it, but only the main thread runs Python's
#: handlers: a Ctrl-C taken by a reader would leave the main thread asleep in
#: get() until its timeout.
READER_BLOCKED_SIGNALS = frozenset({
    signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
    signal.SIGUSR2, signal.SIGALRM, signal.SIGCHLD})


def start_reader(target: Callable[[], None], name: str) -> None:
    """Start a daemon thread that runs ``target`` with :data:`READER_BLOCKED_SIGNALS` blocked
    (a new thread inherits its creator's mask, which is restored at once)."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, READER_BLOCKED_SIGNALS)
    try:
        threading.Thread(target=target, name=name, daemon=True).start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
