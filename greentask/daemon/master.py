"""The master process: bind once, fork the workers, supervise them, obey signals.

Theory of operation
-------------------
The master opens its sockets once (:mod:`~greentask.daemon.endpoints`), maps the
shared :class:`~greentask.daemon.scoreboard.Scoreboard`, monkey-patches, imports
what every child needs (gevent's modules, ``[worker] preload``, the task code)
and freezes it so the children share that memory (:mod:`~greentask.daemon.preload`,
:mod:`~greentask.daemon.taskcode`), then forks ``processes`` children that all serve
the one task port (:class:`~greentask.daemon.brood.Brood`,
:func:`~greentask.daemon.child.run_worker`). The master never has a gevent hub:
its sockets, loop, signal handlers, fork and wait are the operating system's.

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

import logging
import os
import signal
import time
from collections.abc import Callable

from gevent.monkey import get_original

from greentask.config import Config
from greentask.daemon import scoreboard
from greentask.daemon.brood import Brood
from greentask.daemon.census import Census
from greentask.daemon.child import run_worker
from greentask.daemon.children import StartGuard, WorkerProcess
from greentask.daemon.control import ControlError, cancel_target, wanted_processes
from greentask.daemon.endpoints import EndpointError, Endpoints
from greentask.daemon.lifecycle import (
    EXIT_BOOT_ERROR,
    EXIT_CONFIG,
    EXIT_OK,
    processes_text,
    set_process_title,
)
from greentask.daemon.logs import reopen_log_files
from greentask.daemon.preload import prepare_master
from greentask.daemon.reload import Reloader, ReloadInFlight, ReloadOutcome, ReloadRefused
from greentask.daemon.taskcode import TaskCode, TaskModuleError
from greentask.daemon.wakeup import SignalQueue
from greentask.errors import ConfigError
from greentask.registry import default_registry

log = logging.getLogger("greentask.master")

# The real sleep: the master is patched but has no hub (see brood.py).
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
        self.board = scoreboard.Scoreboard(SCOREBOARD_SLOTS)
        self.exit_code = EXIT_OK
        #: Set from a HUP until the old generation is retired.
        self.reload: ReloadInFlight | None = None
        #: What became of the last reload (``greentask reload`` waits on it).
        self.last_reload = ReloadOutcome()
        self.signals = SignalQueue()
        self._stop_deadline: float | None = None
        self.start_guard = StartGuard()
        #: More children to fork than one pass forks: the next pass does not wait.
        self._forks_left = False
        self._started_at = time.monotonic()
        #: The pidfile and sockets, once :meth:`run` opened them.
        self.endpoints: Endpoints
        self.reloader = Reloader(TaskCode(default_registry), reload_config)
        #: The children's counters, and those of the children that exited.
        self.census = Census(self.board)
        #: The live children, as processes.
        self.brood = Brood(self.board, self.census)

    @property
    def workers(self) -> dict[int, WorkerProcess]:
        """The live children by pid."""
        return self.brood.workers

    @property
    def stopping(self) -> bool:
        """True once a stop has begun."""
        return self._stop_deadline is not None

    def run(self) -> int:
        """Bind, prepare what the workers share, fork, supervise until stopped.

        Returns the exit status.
        """
        try:
            self.endpoints = Endpoints.open(self.config, self.handle_command,
                                            self.metrics_snapshot)
        except EndpointError as exc:
            log.error("%s", exc)
            return EXIT_CONFIG
        try:
            # After binding: the master's own sockets are the operating
            # system's, so it never has a gevent hub (see prepare_master).
            prepare_master(self.config.worker.preload)
            self.reloader.load(self.config, self.config)
        except ConfigError as exc:
            log.error("%s", exc)
            self.endpoints.close()
            return EXIT_CONFIG
        except TaskModuleError as exc:
            log.error("%s; the workers could not start", exc, exc_info=exc.__cause__)
            self.endpoints.close()
            return EXIT_BOOT_ERROR
        set_process_title(f"greentask master [{self.config.worker.name}]")
        log.info("%s master %d %s", self.config.worker.name, os.getpid(),
                 self.endpoints.describe(processes_text(self.processes)))
        log.info("%s", self.reloader.task_code.describe(self.config.worker))
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
            self.endpoints.close()
        log.info("master %d exits with status %d", os.getpid(), self.exit_code)
        return self.exit_code

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

    # -- signals -----------------------------------------------------------

    def _sleep(self) -> None:
        self.signals.sleep(self.endpoints.servers, 0.0 if self._forks_left else LOOP_INTERVAL)

    def handle_term(self) -> None:
        """Graceful stop; a second TERM makes it fast."""
        if self.stopping:
            self.handle_quit()
            return
        grace = self.config.worker.graceful_timeout
        log.info("SIGTERM: graceful stop, in-flight tasks get up to %g s", grace)
        self._stop_deadline = time.monotonic() + grace + KILL_MARGIN
        self.brood.signal_all(signal.SIGTERM)

    def handle_int(self) -> None:
        """Fast stop."""
        self.handle_quit()

    def handle_quit(self) -> None:
        """Fast stop: children exit at once."""
        log.info("fast stop")
        self._stop_deadline = time.monotonic() + FAST_STOP_TIMEOUT
        self.brood.signal_all(signal.SIGQUIT)

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
        self.brood.signal_all(signal.SIGUSR1)
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

    # -- children ----------------------------------------------------------

    def reap_workers(self) -> None:
        """Collect dead children; stop everything if they cannot start."""
        for worker, code, served in self.brood.reap():
            self._note_death(worker, code, served)

    def _note_death(self, worker: WorkerProcess, code: int, served: bool) -> None:
        """Count and log a child's death; stop if children keep failing to start."""
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        if not self.stopping:
            self.census.restarts[worker.restart_cause(code)] += 1
        if self.stopping or worker.retired:
            log.info("worker %d %s", worker.pid, how)
            return
        if code == EXIT_BOOT_ERROR:
            self._handle_boot_error(worker)
            return
        if served:
            # However young: a child that served was killed by something else
            # (the OOM killer, an operator), not by its own start.
            self.start_guard.served()
            log.warning("worker %d %s; starting a new one", worker.pid, how)
            return
        delay = self.start_guard.failed_start(time.monotonic())
        if delay is None:
            log.error("worker %d %s, and the last %d workers all died before they served; "
                      "stopping instead of looping. See the errors above", worker.pid, how,
                      self.start_guard.failed)
            self.exit_code = EXIT_BOOT_ERROR
            self.handle_quit()
            return
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
        may_fork = self.start_guard.may_start(time.monotonic())
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
        self.brood.kill(worker.pid, signal.SIGTERM)

    def watch_heartbeats(self) -> None:
        """Kill children whose event loop has stopped running (SIGABRT, then SIGKILL)."""
        self.brood.watch_heartbeats(self.config.worker.heartbeat_timeout)

    def murder_workers(self) -> None:
        """SIGKILL children still alive past their deadline."""
        now = time.monotonic()
        self.brood.kill_overdue(now, self._stop_deadline,
                                self.config.worker.graceful_timeout + KILL_MARGIN)
        if self._stop_deadline is not None and now > self._stop_deadline:
            self._stop_deadline = now + LOOP_INTERVAL

    def spawn_worker(self) -> None:
        """Fork one child of the current generation."""
        self.brood.fork(self.generation, self._serve_in_child)

    def _serve_in_child(self, master_pid: int, number: int, slot_index: int) -> int:
        self.signals.reset_in_child()
        self.endpoints.close_in_child()
        return run_worker(self.endpoints.listener, self.config, master_pid, number,
                          self.board, slot_index)

    # -- control channel ---------------------------------------------------

    def handle_command(self, command: dict[str, object]) -> dict[str, object]:
        """Answer a control command: status, reload, stop, scale or cancel."""
        name = command["command"]
        if name == "status":
            return self.status()
        if name in ("reload", "stop"):
            self.signals.push(signal.SIGHUP if name == "reload" else signal.SIGTERM)
            return {"message": f"{name} started"}
        if name == "scale":
            self.processes = processes = wanted_processes(command,
                                                          self.config.worker.max_processes)
            log.info("scaling to %s", processes_text(processes))
            return {"message": f"scaling to {processes_text(processes)}"}
        if name == "cancel":
            return self.cancel_task(command)
        raise ControlError(f"unknown command {name!r}; the commands are status, reload, stop, "
                           "scale and cancel")

    def cancel_task(self, command: dict[str, object]) -> dict[str, object]:
        """Post a cancel to the worker running a task, named as ``status`` lists it under
        ``running`` (``pid`` and ``key``); it acts at that worker's next heartbeat."""
        pid, key = cancel_target(command, self.workers)
        self.board.activity.post(self.workers[pid].slot_index, key)
        log.info("cancel of task %s posted to worker %d", key, pid)
        return {"message": f"cancel sent to worker {pid}; if the task still runs, it is "
                           "cancelled within a heartbeat"}

    def status(self) -> dict[str, object]:
        """The master's and every child's state and counters."""
        host, port = self.config.worker.bind
        return {"master": {"pid": os.getpid(), "name": self.config.worker.name,
                           "bind": f"{host}:{port}", "generation": self.generation,
                           "processes": self.processes,
                           "uptime": time.monotonic() - self._started_at,
                           "stopping": self.stopping,
                           "control_socket": self.endpoints.control.path,
                           "reload": self.last_reload.as_dict()},
                "workers": self.census.worker_rows(self.workers.values()),
                **self.census.activity(self.workers.values())}

    def metrics_snapshot(self) -> tuple[list[float], list[dict[str, object]], dict[str, object]]:
        """Totals (exited workers plus live ones), per-worker rows, master facts."""
        totals, rows, functions = self.census.snapshot(self.workers.values(),
                                                       default_registry.names())
        return totals, rows, {"processes": self.processes, "generation": self.generation,
                              "restarts": dict(self.census.restarts), "functions": functions}
