"""The master process: bind once, fork the workers, supervise them, obey signals.

Theory of operation
-------------------
The master binds the task port with the plain ``socket`` module, then forks
``processes`` children that all serve that one listener. It never starts a
gevent hub: each child monkey-patches, wraps the inherited descriptor as a
gevent socket, imports the task modules and serves (:func:`run_worker`).

Signal handlers only queue the signal and wake the main loop through a pipe.
Each pass of the loop dispatches the queued signals to ``handle_<name>``,
reaps dead children, and then either starts children up to ``processes``
(running) or kills those past their deadline (stopping).

Signals follow gunicorn, as supervisord, systemd and Docker expect: TERM stops
gracefully (children drain in-flight tasks within ``graceful_timeout``), INT
and QUIT stop fast. A second TERM during a graceful stop turns it fast.
"""

from __future__ import annotations

import errno
import importlib
import logging
import os
import select
import signal
import socket
import time
from dataclasses import dataclass

from greentask.config import Config, set_current
from greentask.errors import GreentaskError

log = logging.getLogger("greentask.master")

#: Exit status: stopped as asked.
EXIT_OK = 0
#: Exit status: the config, a flag or the address is wrong (argparse uses 2 too).
EXIT_CONFIG = 2
#: Exit status: workers cannot start (a task module does not import).
EXIT_BOOT_ERROR = 3

#: Listen backlog: connections the kernel queues while every worker is busy.
LISTEN_BACKLOG = 2048
#: Longest pause of the main loop when nothing wakes it (seconds).
LOOP_INTERVAL = 1.0
#: How long after its deadline a child may take to exit before SIGKILL (seconds).
KILL_MARGIN = 2.0
#: How long children get to exit on a fast stop (seconds).
FAST_STOP_TIMEOUT = 2.0
#: A child that dies younger than this counts as a failed start (seconds).
YOUNG_DEATH = 1.0
#: Longest wait before restarting a child that keeps dying young (seconds).
MAX_RESPAWN_DELAY = 5.0

_SIGNAL_NAMES = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGQUIT: "quit",
                 signal.SIGCHLD: "chld"}


class BindError(GreentaskError):
    """The task port cannot be opened."""


def bind_listener(address: tuple[str, int], backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """Open the listening socket that every worker will share."""
    host, port = address
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise BindError(f"cannot listen on {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        hint = ("another program (another greentask?) uses that port: stop it, or choose "
                "another port with --bind or [worker] bind") if exc.errno == errno.EADDRINUSE \
            else "check [worker] bind"
        raise BindError(f"cannot listen on {host}:{port}: {exc.strerror}; {hint}") from None
    return sock


@dataclass
class WorkerProcess:
    """What the master knows about one child."""

    pid: int
    started_at: float


class Arbiter:
    """The master: owns the listener and the children."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.listener: socket.socket | None = None
        self.workers: dict[int, WorkerProcess] = {}
        self.exit_code = EXIT_OK
        self._signals: list[int] = []
        self._wakeup_r = self._wakeup_w = -1
        self._stop_deadline: float | None = None
        self._young_deaths = 0
        self._respawn_at = 0.0

    @property
    def stopping(self) -> bool:
        """True once a stop has begun."""
        return self._stop_deadline is not None

    def run(self) -> int:
        """Bind, fork, supervise until stopped; return the exit status."""
        try:
            self.listener = bind_listener(self.config.worker.bind)
        except BindError as exc:
            log.error("%s", exc)
            return EXIT_CONFIG
        host, port = self.listener.getsockname()[:2]
        log.info("%s master %d listening at %s:%d with %d worker processes",
                 self.config.worker.name, os.getpid(), host, port, self.config.worker.processes)
        self._install_signals()
        try:
            while self.workers or not self.stopping:
                if not self.stopping:
                    self.manage_workers()
                self._sleep()
                self._dispatch_signals()
                self.reap_workers()
                if self.stopping:
                    self.murder_workers()
        finally:
            self.listener.close()
        log.info("master %d exits with status %d", os.getpid(), self.exit_code)
        return self.exit_code

    def _install_signals(self) -> None:
        self._wakeup_r, self._wakeup_w = os.pipe()
        for fd in (self._wakeup_r, self._wakeup_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self._wakeup_w)
        for signum in _SIGNAL_NAMES:
            signal.signal(signum, self._queue_signal)

    def _queue_signal(self, signum: int, frame: object) -> None:
        # Only record it: the main loop does the work, outside the handler.
        self._signals.append(signum)

    def _sleep(self) -> None:
        if self._signals:
            return
        try:
            select.select([self._wakeup_r], [], [], LOOP_INTERVAL)
            while os.read(self._wakeup_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _dispatch_signals(self) -> None:
        while self._signals:
            signum = self._signals.pop(0)
            getattr(self, f"handle_{_SIGNAL_NAMES[signum]}")()

    def handle_term(self) -> None:
        """Graceful stop; a second TERM makes it fast."""
        if self.stopping:
            self.handle_quit()
            return
        grace = self.config.worker.graceful_timeout
        log.info("SIGTERM: graceful stop, in-flight tasks get up to %g s", grace)
        self._stop_deadline = time.monotonic() + grace + KILL_MARGIN
        self.signal_workers(signal.SIGTERM)

    def handle_int(self) -> None:
        """Fast stop."""
        self.handle_quit()

    def handle_quit(self) -> None:
        """Fast stop: children exit at once."""
        log.info("fast stop")
        self._stop_deadline = time.monotonic() + FAST_STOP_TIMEOUT
        self.signal_workers(signal.SIGQUIT)

    def handle_chld(self) -> None:
        """A child changed state: the loop reaps it next."""

    def signal_workers(self, signum: int) -> None:
        """Send ``signum`` to every child."""
        for pid in list(self.workers):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    def reap_workers(self) -> None:
        """Collect dead children; stop everything if they cannot start."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if not pid:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            self._note_death(worker, code)

    def _note_death(self, worker: WorkerProcess, code: int) -> None:
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        if self.stopping:
            log.info("worker %d %s", worker.pid, how)
            return
        if code == EXIT_BOOT_ERROR:
            log.error("worker %d could not start (see its error above); stopping. Fix the "
                      "[worker] tasks modules, then start again", worker.pid)
            self.exit_code = EXIT_BOOT_ERROR
            self.handle_quit()
            return
        log.warning("worker %d %s; starting a new one", worker.pid, how)
        if time.monotonic() - worker.started_at < YOUNG_DEATH:
            self._young_deaths += 1
            delay = min(0.1 * 2 ** self._young_deaths, MAX_RESPAWN_DELAY)
            self._respawn_at = time.monotonic() + delay
        else:
            self._young_deaths = 0

    def manage_workers(self) -> None:
        """Start children until there are ``processes`` of them."""
        if time.monotonic() < self._respawn_at:
            return
        while len(self.workers) < self.config.worker.processes:
            self.spawn_worker()

    def murder_workers(self) -> None:
        """SIGKILL children still alive past the stop deadline."""
        if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
            for pid in list(self.workers):
                log.warning("worker %d did not exit in time; killing it", pid)
            self.signal_workers(signal.SIGKILL)
            self._stop_deadline = time.monotonic() + LOOP_INTERVAL

    def spawn_worker(self) -> None:
        """Fork one child; in the child, serve and never return."""
        master_pid = os.getpid()
        pid = os.fork()
        if pid:
            self.workers[pid] = WorkerProcess(pid, time.monotonic())
            log.debug("started worker %d", pid)
            return
        code = EXIT_BOOT_ERROR
        try:
            self._reset_in_child()
            code = run_worker(self.listener, self.config, master_pid)
        except BaseException:
            log.exception("worker %d failed", os.getpid())
        finally:
            logging.shutdown()
            os._exit(code)

    def _reset_in_child(self) -> None:
        signal.set_wakeup_fd(-1)
        for signum in _SIGNAL_NAMES:
            signal.signal(signum, signal.SIG_DFL)
        os.close(self._wakeup_r)
        os.close(self._wakeup_w)


def import_task_modules(modules: list[str]) -> None:
    """Import each task module, so its ``@task`` functions register."""
    for name in modules:
        importlib.import_module(name)


def run_worker(listener: socket.socket, config: Config, master_pid: int) -> int:
    """A child's life: patch, import the tasks, serve; return the exit status."""
    from gevent import monkey
    monkey.patch_all()
    import gevent.socket

    from greentask.registry import default_registry
    from greentask.server import Worker

    set_current(config)
    try:
        import_task_modules(config.worker.tasks)
    except Exception as exc:
        log.error("worker %d cannot import task module: %s: %s", os.getpid(),
                  type(exc).__name__, exc, exc_info=True)
        return EXIT_BOOT_ERROR
    # A socket made before monkey-patching is not a gevent socket; serving it
    # as-is accepts nothing, so re-wrap its descriptor (as gunicorn's gevent
    # worker does).
    gevent_listener = gevent.socket.socket(fileno=listener.detach())
    Worker(gevent_listener, config, default_registry, master_pid).serve_forever()
    return EXIT_OK
