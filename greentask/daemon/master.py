"""The master process: bind once, fork the workers, supervise them, obey signals.

Theory of operation
-------------------
The master binds the task port once, maps the shared
:class:`~greentask.daemon.scoreboard.Scoreboard`, then forks ``processes`` children
that all serve that one listener (:func:`greentask.daemon.child.run_worker`).
Once its sockets are open, it monkey-patches, imports the modules every child
needs (gevent's, ``[worker] preload`` and the task modules) and freezes them
for the garbage collector, so the children share that memory
(:func:`~greentask.daemon.child.prepare_master`, :mod:`greentask.daemon.taskcode`). A
reload imports the task code again in the master before forking the new
generation. The master itself never has a gevent hub: its sockets, loop,
signal handlers, fork and wait are the operating system's.

Signal handlers only queue the signal and wake the main loop through a pipe.
Each pass of the loop dispatches the queued signals to ``handle_<name>``,
reaps dead children, kills children whose heartbeat stopped, and then either
manages the children (running) or kills those past their deadline (stopping).

Children belong to a *generation*. A reload (HUP) starts a new generation;
an old child, or one that asks to be recycled, is retired (SIGTERM: it drains
its in-flight tasks) only while enough newer children are ready to keep
``processes`` serving. The listener never closes, so no connection is refused.

Signals follow gunicorn, as supervisord, systemd and Docker expect: TERM stops
gracefully, INT and QUIT stop fast, HUP reloads, TTIN/TTOU add or remove a
child. A second TERM during a graceful stop turns it fast.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

from gevent.monkey import get_original

from greentask.config import Config, control_socket_path
from greentask.daemon import scoreboard
from greentask.daemon.census import Census
from greentask.daemon.child import run_worker
from greentask.daemon.children import ChildPhase, WorkerProcess
from greentask.daemon.control import ControlError, ControlServer, remove_pidfile, write_pidfile
from greentask.daemon.lifecycle import (
    EXIT_BOOT_ERROR,
    EXIT_CONFIG,
    EXIT_OK,
    WORKER_SIGNALS,
    processes_text,
    set_process_title,
)
from greentask.daemon.listener import BindError, bind_listener
from greentask.daemon.logs import reopen_log_files
from greentask.daemon.oneshot import OneShotServer
from greentask.daemon.preload import prepare_master
from greentask.daemon.reload import Reloader, ReloadInFlight, ReloadOutcome, ReloadRefused
from greentask.daemon.taskcode import TaskCode, TaskModuleError
from greentask.daemon.wakeup import SignalQueue
from greentask.registry import default_registry

log = logging.getLogger("greentask.master")

# The master is monkey-patched (what it imports for the workers must see
# gevent) but has no gevent hub: gevent's fork would start libev child
# watchers that reap the children before the master does, and its waitpid
# would wait in a hub. So the master keeps the real calls (wakeup.py does the
# same for poll and signals). Its sockets are bound before patching.
_fork = get_original("os", "fork")
_waitpid = get_original("os", "waitpid")
_pause = get_original("time", "sleep")

#: Longest pause of the main loop when nothing wakes it (seconds).
LOOP_INTERVAL = 0.5
#: How long after its deadline a child may take to exit before SIGKILL (seconds).
KILL_MARGIN = 2.0
#: How long children get to exit on a fast stop (seconds).
FAST_STOP_TIMEOUT = 2.0
#: Most children forked in one pass of the loop: the control socket and
#: signals are served between passes, so a big scale-up never silences them.
FORKS_PER_PASS = 8
#: After SIGABRT, how long a hung child gets to dump its traceback before SIGKILL.
ABORT_GRACE = 1.0
#: Children in a row that may die before they ever serve, before the master
#: gives up (status 3).
MAX_FAILED_STARTS = 10
#: Longest wait before restarting a child that keeps dying before it serves (seconds).
MAX_RESPAWN_DELAY = 5.0
#: Worker slots in the scoreboard: the most children alive at once, old and new.
SCOREBOARD_SLOTS = 1024

__all__ = ["Master"]


class Master:
    """The master: owns the listener, the scoreboard and the children.

    ``reload_config`` re-reads the settings for a HUP (the worker passes one
    that applies the same file and flags as at start).
    """

    def __init__(self, config: Config,
                 reload_config: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.processes = config.worker.processes
        self.generation = 1
        self.listener: socket.socket | None = None
        self.board = scoreboard.Scoreboard(SCOREBOARD_SLOTS)
        self.workers: dict[int, WorkerProcess] = {}
        self.exit_code = EXIT_OK
        #: Set from a HUP until the old generation is retired.
        self.reload: ReloadInFlight | None = None
        #: What became of the last reload (``greentask reload`` waits on it).
        self.last_reload = ReloadOutcome()
        self.signals = SignalQueue()
        self._stop_deadline: float | None = None
        self._failed_starts = 0
        self._respawn_at = 0.0
        self._numbers = 0
        #: More children to fork than one pass forks: the next pass does not wait.
        self._forks_left = False
        self._started_at = time.monotonic()
        self.control: ControlServer | None = None
        self.metrics: OneShotServer | None = None
        self.reloader = Reloader(TaskCode(default_registry), reload_config)
        #: The pidfile written at start (a reload does not move it).
        self._pidfile = config.worker.pidfile
        #: The children's counters, and those of the children that exited.
        self.census = Census(self.board)

    @property
    def stopping(self) -> bool:
        """True once a stop has begun."""
        return self._stop_deadline is not None

    def run(self) -> int:
        """Bind, prepare what the workers share, fork, supervise until stopped.

        Returns the exit status.
        """
        if not self._open():
            return EXIT_CONFIG
        try:
            # After binding: the master's own sockets are the operating
            # system's, so it never has a gevent hub (see prepare_master).
            prepare_master(self.config.worker.preload)
            self.reloader.load(self.config, self.config)
        except TaskModuleError as exc:
            log.error("%s; the workers could not start", exc, exc_info=exc.__cause__)
            self._close()
            return EXIT_BOOT_ERROR
        assert self.listener is not None and self.control is not None
        host, port = self.listener.getsockname()[:2]
        set_process_title(f"greentask master [{self.config.worker.name}]")
        log.info("%s master %d listening at %s:%d with %s; control socket %s%s",
                 self.config.worker.name, os.getpid(), host, port,
                 processes_text(self.processes), self.control.path,
                 "" if self.metrics is None else
                 "; metrics at http://{}:{}/metrics".format(*self.metrics.address))
        self._log_tasks()
        self.signals.install()
        try:
            while self.workers or not self.stopping:
                try:
                    self._supervise_once()
                except Exception:
                    # Supervision must outlive any one bug: the workers keep
                    # serving, and the next pass starts from fresh state.
                    log.exception("master %d: unexpected error in its loop; supervision "
                                  "goes on", os.getpid())
                    _pause(LOOP_INTERVAL)
        finally:
            self._close()
        log.info("master %d exits with status %d", os.getpid(), self.exit_code)
        return self.exit_code

    def _log_tasks(self) -> None:
        worker = self.config.worker
        if worker.preload_tasks:
            names = default_registry.names()
            shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
            log.info("task modules %s: %d tasks (%s)", ", ".join(worker.tasks), len(names),
                     shown)
        else:
            log.info("task modules %s: each worker imports them (preload_tasks = false)",
                     ", ".join(worker.tasks))

    def _supervise_once(self) -> None:
        """One pass of the main loop."""
        if not self.stopping:
            self.manage_workers()
        self._sleep()
        for name in self.signals.take():
            getattr(self, f"handle_{name}")()
        self.reap_workers()
        self.watch_heartbeats()
        self.murder_workers()

    def _open(self) -> bool:
        """Write the pidfile, bind the task port, the control socket and metrics."""
        try:
            if self._pidfile:
                write_pidfile(self._pidfile)
            self.listener = bind_listener(self.config.worker.bind)
            self.control = ControlServer(control_socket_path(self.config), self.handle_command)
            if self.config.worker.metrics_bind:
                # Imported only when used: prometheus_client and what it imports
                # add about 2 MiB to the master, which every worker would map too.
                from greentask.daemon.metrics import MetricsServer
                self.metrics = MetricsServer(self.config.worker.metrics_bind,
                                             self.metrics_snapshot)
        except (BindError, ControlError, OSError) as exc:
            log.error("%s", exc)
            self._close()
            return False
        return True

    def _close(self) -> None:
        for server in (self.listener, self.control, self.metrics):
            if server is not None:
                server.close()
        if self._pidfile:
            remove_pidfile(self._pidfile)

    # -- signals -----------------------------------------------------------

    def _sleep(self) -> None:
        assert self.control is not None
        servers = [self.control] if self.metrics is None else [self.control, self.metrics]
        self.signals.sleep(servers, 0.0 if self._forks_left else LOOP_INTERVAL)

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

    def handle_hup(self) -> None:
        """Reload: re-read the config and replace every child with a new generation."""
        if self.stopping:
            self.last_reload.refused(self.generation, "the master is stopping")
            return
        try:
            config, self.reload = self.reloader.begin(self.config, self.generation,
                                                      self.processes)
        except ReloadRefused as exc:
            self.last_reload.refused(self.generation, str(exc))
            return
        self.config = config
        self.processes = config.worker.processes
        self.generation += 1
        self.last_reload.begun(self.generation)
        logging.getLogger().setLevel(config.worker.loglevel)
        log.info("SIGHUP: reloading: starting generation %d (%d workers)", self.generation,
                 self.processes)

    def handle_usr2(self) -> None:
        """A child asks to be replaced (recycling): the loop starts its replacement next."""

    def handle_usr1(self) -> None:
        """Reopen log files (after logrotate moved them), here and in every child."""
        reopen_log_files()
        self.signal_workers(signal.SIGUSR1)
        log.info("SIGUSR1: log files reopened")

    def handle_ttin(self) -> None:
        """One more child, up to ``max_processes``."""
        if self.processes >= self.config.worker.max_processes:
            log.warning("SIGTTIN: already at [worker] max_processes = %d; raise it to run more",
                        self.config.worker.max_processes)
            return
        self.processes += 1
        log.info("SIGTTIN: %s", processes_text(self.processes))

    def handle_ttou(self) -> None:
        """One child fewer (never fewer than one)."""
        self.processes = max(1, self.processes - 1)
        log.info("SIGTTOU: %s", processes_text(self.processes))

    def signal_workers(self, signum: int) -> None:
        """Send ``signum`` to every child."""
        for pid in list(self.workers):
            self._kill(pid, signum)

    @staticmethod
    def _kill(pid: int, signum: int) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    # -- children ----------------------------------------------------------

    def reap_workers(self) -> None:
        """Collect dead children; stop everything if they cannot start."""
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
            self._note_death(worker, os.waitstatus_to_exitcode(status), served)

    def _note_death(self, worker: WorkerProcess, code: int, served: bool) -> None:
        """Count and log a child's death; stop if children keep failing to start."""
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        if not self.stopping:
            self.census.restarts[worker.retire_cause or (
                "watchdog" if worker.phase is ChildPhase.ABORTED else
                "boot" if code == EXIT_BOOT_ERROR else "crash")] += 1
        if self.stopping or worker.retired:
            log.info("worker %d %s", worker.pid, how)
            return
        if code == EXIT_BOOT_ERROR:
            self._handle_boot_error(worker)
            return
        if served:
            # However young: a child that served was killed by something else
            # (the OOM killer, an operator), not by its own start.
            self._failed_starts = 0
            log.warning("worker %d %s; starting a new one", worker.pid, how)
            return
        self._failed_starts += 1
        if self._failed_starts >= MAX_FAILED_STARTS:
            log.error("worker %d %s, and the last %d workers all died before they served; "
                      "stopping instead of looping. See the errors above", worker.pid, how,
                      self._failed_starts)
            self.exit_code = EXIT_BOOT_ERROR
            self.handle_quit()
            return
        delay = min(0.1 * 2 ** self._failed_starts, MAX_RESPAWN_DELAY)
        self._respawn_at = time.monotonic() + delay
        log.warning("worker %d %s before it served; starting a new one in %.1f s",
                    worker.pid, how, delay)

    def _handle_boot_error(self, worker: WorkerProcess) -> None:
        older = [w for w in self.workers.values() if w.generation < worker.generation]
        if older and self.reload is not None:
            # The new generation cannot start: go on with the one that works,
            # and with its code, which the children that replace it fork from.
            reload, self.reload = self.reload, None
            self.config, self.generation, self.processes = \
                reload.config, reload.generation, reload.processes
            self.reloader.roll_back(reload)
            log.error("reload failed: worker %d of the new generation could not start (see "
                      "its error above); generation %d keeps serving. Fix what that error "
                      "names, then reload again", worker.pid, self.generation)
            self.last_reload.failed(
                f"worker {worker.pid} of the new generation could not start (its error is in "
                f"the worker log); generation {self.generation} keeps serving")
            for other in list(self.workers.values()):
                if other.generation > self.generation:
                    self.retire(other, "failed reload")
            return
        log.error("worker %d could not start (see its error above); stopping. Fix what "
                  "that error names, then start again", worker.pid)
        self.exit_code = EXIT_BOOT_ERROR
        self.handle_quit()

    def _is_outgoing(self, worker: WorkerProcess) -> bool:
        """True for a child of an older generation, or one that asked to be recycled."""
        return worker.generation != self.generation or \
            self.board.slot(worker.slot_index).state == scoreboard.RECYCLE

    def manage_workers(self) -> None:
        """Start, scale and retire children so ``processes`` of the newest serve."""
        active = [w for w in self.workers.values() if not w.retired]
        current = [w for w in active if not self._is_outgoing(w)]
        # Scale down: retire the children that are least ready, newest first.
        current.sort(key=lambda w: (self.board.slot(w.slot_index).state == scoreboard.READY,
                                    -w.started_at), reverse=True)
        for extra in current[self.processes:]:
            self.retire(extra, "scale")
        missing = self.processes - len(current)
        may_fork = time.monotonic() >= self._respawn_at
        self._forks_left = may_fork and missing > FORKS_PER_PASS
        if may_fork:
            for _ in range(min(missing, FORKS_PER_PASS)):
                self.spawn_worker()
        ready = sum(self.board.slot(w.slot_index).state == scoreboard.READY
                    for w in current[:self.processes])
        outgoing = sorted((w for w in active if self._is_outgoing(w)),
                          key=lambda w: w.started_at)
        # Retire an outgoing child only while ready children would still
        # number at least `processes` without it.
        while outgoing and ready + len(outgoing) - 1 >= self.processes:
            oldest = outgoing.pop(0)
            self.retire(oldest, "reload" if oldest.generation != self.generation else "recycle")
        if not outgoing and self.reload is not None:
            self.reload = None
            self.last_reload.serving()

    def retire(self, worker: WorkerProcess, cause: str) -> None:
        """Tell a child to drain and exit; ``cause`` is counted in the metrics."""
        worker.retire(cause)
        log.info("retiring worker %d (generation %d)", worker.pid, worker.generation)
        self._kill(worker.pid, signal.SIGTERM)

    def watch_heartbeats(self) -> None:
        """Kill children whose event loop has stopped running (SIGABRT, then SIGKILL)."""
        now = time.monotonic()
        limit = self.config.worker.heartbeat_timeout
        for worker in list(self.workers.values()):
            if worker.phase is ChildPhase.ABORTED:
                if now - worker.phase_since > ABORT_GRACE:
                    self._kill(worker.pid, signal.SIGKILL)
                continue
            silent = now - self.board.slot(worker.slot_index).get(scoreboard.HEARTBEAT)
            if silent > limit:
                log.error("worker %d: its event loop has been blocked for %.1f s (more than "
                          "heartbeat_timeout = %g s), so a task is computing without yielding;"
                          " killing it (its traceback follows)", worker.pid, silent, limit)
                worker.enter(ChildPhase.ABORTED, now)
                self._kill(worker.pid, signal.SIGABRT)

    def murder_workers(self) -> None:
        """SIGKILL children still alive past their deadline."""
        now = time.monotonic()
        grace = self.config.worker.graceful_timeout + KILL_MARGIN
        for worker in list(self.workers.values()):
            overdue = (self._stop_deadline is not None and now > self._stop_deadline) or \
                (worker.phase is ChildPhase.RETIRING and now - worker.phase_since > grace)
            if overdue:
                log.warning("worker %d did not exit in time; killing it", worker.pid)
                self._kill(worker.pid, signal.SIGKILL)
        if self._stop_deadline is not None and now > self._stop_deadline:
            self._stop_deadline = now + LOOP_INTERVAL

    def spawn_worker(self) -> None:
        """Fork one child; in the child, serve and never return."""
        master_pid = os.getpid()
        slot_index = self.board.claim(self.generation)
        self._numbers += 1
        # What the master allocated is now never scanned by a child's garbage
        # collector, which would otherwise copy every page it touches.
        gc.freeze()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_SIGNALS)
        pid = _fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            self.board.slot(slot_index).set(scoreboard.PID, pid)
            now = time.monotonic()
            self.workers[pid] = WorkerProcess(pid, slot_index, self.generation, self._numbers,
                                              started_at=now, phase_since=now)
            log.debug("started worker %d", pid)
            return
        code = EXIT_BOOT_ERROR
        try:
            self._reset_in_child()
            code = run_worker(self.listener, self.config, master_pid, self._numbers,
                              self.board, slot_index)
        except BaseException:
            log.exception("worker %d failed", os.getpid())
        finally:
            logging.shutdown()
            os._exit(code)

    def _reset_in_child(self) -> None:
        self.signals.reset_in_child()
        if self.control is not None:
            for fd in self.control.fds():
                os.close(fd)

    # -- control channel ---------------------------------------------------

    def handle_command(self, command: dict[str, object]) -> dict[str, object]:
        """Answer a control command: status, reload, stop or scale."""
        name = command["command"]
        if name == "status":
            return self.status()
        if name in ("reload", "stop"):
            self.signals.push(signal.SIGHUP if name == "reload" else signal.SIGTERM)
            return {"message": f"{name} started"}
        if name == "scale":
            processes = command.get("processes")
            if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
                raise ControlError("scale needs a whole number of processes, at least 1")
            most = self.config.worker.max_processes
            if processes > most:
                raise ControlError(f"scale {processes}: more than [worker] max_processes = "
                                   f"{most}; nothing changed (raise max_processes in the config "
                                   "and reload, if this machine can run that many)")
            self.processes = processes
            log.info("scaling to %s", processes_text(processes))
            return {"message": f"scaling to {processes_text(processes)}"}
        raise ControlError(f"unknown command {name!r}; the commands are status, reload, stop "
                           "and scale")

    def status(self) -> dict[str, object]:
        """The master's and every child's state and counters."""
        host, port = self.config.worker.bind
        return {"master": {"pid": os.getpid(), "name": self.config.worker.name,
                           "bind": f"{host}:{port}", "generation": self.generation,
                           "processes": self.processes,
                           "uptime": time.monotonic() - self._started_at,
                           "stopping": self.stopping,
                           "control_socket": self.control.path if self.control else None,
                           "reload": self.last_reload.as_dict()},
                "workers": self.census.worker_rows(self.workers.values())}

    def metrics_snapshot(self) -> tuple[list[float], list[dict[str, object]], dict[str, object]]:
        """Totals (exited workers plus live ones), per-worker rows, master facts."""
        totals, rows, functions = self.census.snapshot(self.workers.values())
        # Every registered task from 0, so dashboards and alerts see it before it runs.
        functions = {name: [0.0] * len(scoreboard.OUTCOMES)
                     for name in default_registry.names()} | functions
        return totals, rows, {"processes": self.processes, "generation": self.generation,
                              "restarts": dict(self.census.restarts), "functions": functions}
