"""The master's sleep: signals queued by their handlers, a wake-up pipe, its small servers.

Signal handlers only record the signal (gunicorn's arbiter does the same):
the main loop asks :meth:`SignalQueue.sleep` to wait until a signal, a
control or metrics request, or the loop's interval, then takes the queued
signals' names with :meth:`SignalQueue.take` and dispatches ``handle_<name>``.

The master is monkey-patched (what it imports for the workers must see
gevent) but has no gevent hub: gevent's select would start one and its
signal handlers are only called from one, so these are the real calls. It
waits with ``poll``, not ``select``: a burst of clients can push descriptors
past 1023, which ``select`` refuses with an error.
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Iterator, Sequence

from gevent.monkey import get_original

from greentask.daemon.oneshot import OneShotServer

_poll = get_original("select", "poll")
_set_signal_handler = get_original("signal", "signal")

#: The signals the master handles, by the name of their ``handle_<name>``.
MASTER_SIGNALS = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGQUIT: "quit",
                  signal.SIGCHLD: "chld", signal.SIGHUP: "hup", signal.SIGTTIN: "ttin",
                  signal.SIGTTOU: "ttou", signal.SIGUSR1: "usr1", signal.SIGUSR2: "usr2"}


class SignalQueue:
    """Signals received and not yet handled, and the pipe that wakes the master for them."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self._read_fd = self._write_fd = -1

    def install(self) -> None:
        """Queue every master signal from now on."""
        self._read_fd, self._write_fd = os.pipe()
        for fd in (self._read_fd, self._write_fd):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._write_fd)
        for signum in MASTER_SIGNALS:
            _set_signal_handler(signum, self._queue)

    def _queue(self, signum: int, frame: object) -> None:
        # Only record it: the main loop does the work, outside the handler.
        self.pending.append(signum)

    def push(self, signum: int) -> None:
        """Queue ``signum`` as if it had been received (a control command)."""
        self.pending.append(signum)

    def take(self) -> Iterator[str]:
        """The names of the queued signals, oldest first, each taken off the queue."""
        while self.pending:
            yield MASTER_SIGNALS[self.pending.pop(0)]

    def sleep(self, servers: Sequence[OneShotServer], interval: float) -> None:
        """Wait for a signal, a request to one of ``servers`` (served here) or ``interval``."""
        if self.pending:
            return
        timeout = min(server.timeout(interval) for server in servers)
        poller = _poll()
        for fd in (self._read_fd, *(fd for server in servers for fd in server.fds())):
            poller.register(fd, select.POLLIN)
        try:
            readable = {fd for fd, _ in poller.poll(timeout * 1000)}
        except InterruptedError:
            return
        for server in servers:
            server.serve(readable)
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def reset_in_child(self) -> None:
        """In a forked child: default handlers, and the pipe closed."""
        signal.set_wakeup_fd(-1)
        for signum in MASTER_SIGNALS:
            _set_signal_handler(signum, signal.SIG_DFL)
        os.close(self._read_fd)
        os.close(self._write_fd)
