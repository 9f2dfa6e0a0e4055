"""One worker process: serve the listener it inherited with a gevent ``StreamServer``.

Theory of operation
-------------------
Each accepted connection is a :class:`~greentask.daemon.connection.Connection`,
served by a reader greenlet. Its requests run in the process's
``concurrency`` task slots; when every slot is busy a reader waits, so the
peers' requests wait in TCP buffers (backpressure) instead of being dropped.
Task and connection greenlets are reused: a new greenlet costs an ``mmap``
of its stack. Task greenlets never block on a socket: they queue their reply
in the connection's :class:`~greentask.daemon.writer.ReplyWriter`, which sends what
one loop turn queued in one write.

On SIGTERM the process stops accepting, tells pipelining peers it is closing
(``{"closing": true}``), answers new requests with ``ShuttingDown``, lets
in-flight tasks finish within ``graceful_timeout``, waits (within the same
bound) for those peers to close, and exits. SIGINT and SIGQUIT exit at once.
The process beats a heartbeat and keeps its counters in its scoreboard slot
(:mod:`greentask.daemon.scoreboard`); the master reads them.

The master imports this module for its children after monkey-patching (see
:func:`greentask.daemon.preload.prepare_master`); only the children run it.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import time
import traceback
from collections.abc import Callable
from typing import Any

import gevent
import gevent.socket
import greenlet
from gevent.event import Event
from gevent.lock import Semaphore
from gevent.server import StreamServer

from greentask.config import Config
from greentask.daemon import scoreboard
from greentask.daemon.connection import Connection, linger
from greentask.daemon.lifecycle import WORKER_SIGNALS
from greentask.daemon.logs import reopen_log_files
from greentask.errors import BadRequest, RemoteError, TaskError, TaskTimeout
from greentask.protocol import Request, encode_closing, encode_error, encode_result
from greentask.registry import Registry, call_task, progress_sink

log = logging.getLogger("greentask.worker")

#: Idle greenlets (they run tasks and connections) always kept for reuse, each
#: about 20 KiB; above this, each heartbeat frees those the last peak did not need.
IDLE_RUNNERS_FLOOR = 64
#: Longest time between two heartbeats; each also checks that the master lives
#: and reads the RSS (seconds).
HEARTBEAT_INTERVAL = 1.0
#: Longest TLS handshake; a peer that takes longer is disconnected (seconds).
HANDSHAKE_TIMEOUT = 10.0
#: Task limits at least this long are enforced by a sweep every
#: DEADLINE_SWEEP_INTERVAL instead of a timer per task, which costs about a
#: microsecond per task; shorter ones get their own timer (seconds).
COARSE_TIMEOUT_MIN = 2.0
#: How often the sweep checks running tasks against their deadline (seconds).
DEADLINE_SWEEP_INTERVAL = 0.25
#: How often a draining worker checks whether its peers have closed (seconds).
DRAIN_POLL_INTERVAL = 0.05
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class _Expired(BaseException):
    """Thrown into a task past its deadline by the sweep (BaseException, like gevent.Timeout,
    so a task's ``except Exception`` does not swallow it)."""


def close_after_refusal(sock: socket.socket) -> None:
    """Close a connection refused at the handshake so the peer reads why (an alert, a line)."""
    # Detached from a failed TLS socket: what lingering reads is raw bytes.
    plain = gevent.socket.socket(fileno=sock.detach())
    try:
        linger(plain)
    finally:
        plain.close()


def resident_memory() -> int:
    """This process's resident set size in bytes (from /proc/self/statm)."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE_SIZE


class ProcessServer:
    """A worker process's server: the shared listener, the task pool, the drain."""

    def __init__(self, listener: socket.socket, config: Config, registry: Registry,
                 master_pid: int, slot: scoreboard.Slot, max_tasks: int = 0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.config = config
        self.registry = registry
        self.master_pid = master_pid
        #: This process's row in the master's scoreboard (state, counters, heartbeat).
        self.slot = slot
        #: Ask to be replaced after this many tasks (0: never).
        self.max_tasks = max_tasks
        #: Time each task for the metrics histogram (only when metrics are served).
        self.measure_durations = config.worker.metrics_bind is not None
        #: One slot per task that may run at once; a reader that cannot get
        #: one stops reading (backpressure).
        self.slots = Semaphore(config.worker.concurrency)
        self.tasks: set[greenlet.greenlet] = set()
        #: Finished greenlets kept to run the next task or connection.
        self._idle_runners: list[greenlet.greenlet] = []
        self._busy_runners = 0
        self._peak_busy_runners = 0
        self._loop = gevent.get_hub().loop
        self._no_tasks = Event()
        self._no_tasks.set()
        #: Running tasks with a coarse limit: greenlet -> (deadline, what to throw).
        self._deadlines: dict[greenlet.greenlet, tuple[float, _Expired]] = {}
        self.server = StreamServer(listener, self.handle_connection, spawn=self._spawn_reusing)
        settings = config.worker
        self._max_connections = settings.max_connections
        self._task_timeout = settings.task_timeout
        self._open_sockets = 0
        self._accept_paused = False
        #: TLS on the task port (``[worker] certfile``), or None.
        self.ssl_context = ssl_context
        token = config.worker.auth_token_file
        self.auth_token: bytes | None = token.encode() if token else None
        self._refusals: dict[str, int] = {}
        # Several processes share this listener: take one connection per wake-up
        # so a busy process does not grab a burst that idle siblings could serve.
        self.server.max_accept = 1
        self.connections: set[Connection] = set()
        self.draining = False
        self.replies_dropped = 0
        self._stopped = Event()

    def handle_connection(self, sock: socket.socket, address: Any) -> None:
        """StreamServer handler: serve one connection until it ends.

        TCP_NODELAY is set on the listener, and accepted sockets inherit it.
        """
        self._open_sockets += 1
        if self._open_sockets >= self._max_connections:
            # Full: stop accepting; the kernel queues new connections for
            # this process's siblings (or until one of these closes).
            self._accept_paused = True
            self.server.stop_accepting()
        try:
            self._serve_socket(sock, str(address[0]) if address else "?")
        finally:
            self._open_sockets -= 1
            if self._accept_paused and not self.draining:
                self._accept_paused = False
                self.server.start_accepting()

    def _serve_socket(self, sock: socket.socket, peer: str) -> None:
        if self.ssl_context is not None:
            tls_sock = self._handshake(sock, peer)
            if tls_sock is None:
                return
            try:
                self._serve_connection(tls_sock, peer)
            finally:
                # The TLS socket took over the descriptor: StreamServer closes
                # only the plain socket it accepted, now empty.
                tls_sock.close()
            return
        self._serve_connection(sock, peer)

    def _serve_connection(self, sock: socket.socket, peer: str) -> None:
        connection = Connection(self, sock, peer)
        self.connections.add(connection)
        self.slot.add(scoreboard.CONNECTIONS)
        try:
            connection.serve()
        finally:
            self.connections.discard(connection)
            self.slot.add(scoreboard.CONNECTIONS, -1)

    def _handshake(self, sock: socket.socket, peer: str) -> socket.socket | None:
        """Wrap ``sock`` in TLS; None (and the socket closed) when the handshake fails."""
        assert self.ssl_context is not None
        # The only socket timeout on a connection: idle peers are otherwise
        # swept by the heartbeat, which does not see a half-done handshake.
        sock.settimeout(HANDSHAKE_TIMEOUT)
        tls_sock = None
        try:
            if sock.recv(1, socket.MSG_PEEK) == b"{":
                # A plain-text client: answer in words it can read.
                sock.sendall(encode_error(None, BadRequest(
                    "this task port speaks TLS only; connect with TLS (TaskClient("
                    "ssl_context=greentask.tls.client_context(...)), [gateway] tls = true)")))
                raise ValueError("plain text sent to the TLS port")
            tls_sock = self.ssl_context.wrap_socket(sock, server_side=True,
                                                    do_handshake_on_connect=False)
            tls_sock.do_handshake()
        except (OSError, ValueError) as exc:
            self.note_refused(peer, f"TLS handshake failed ({exc})")
            close_after_refusal(tls_sock or sock)
            return None
        tls_sock.settimeout(None)
        return tls_sock

    def note_refused(self, peer: str, reason: str) -> None:
        """Count a refused connection; log the 1st, 10th, 100th... from each peer."""
        failures = self._refusals[peer] = self._refusals.get(peer, 0) + 1
        if failures == 10 ** (len(str(failures)) - 1):
            log.warning("worker %d: connection from %s refused: %s (%d time%s)",
                        os.getpid(), peer, reason, failures, "" if failures == 1 else "s")

    def count_dropped(self, replies: int) -> None:
        """Count replies whose peer was gone."""
        self.replies_dropped += replies

    def run_in_slot(self, function: Callable[..., None], *args: Any) -> None:
        """Run ``function`` in this greenlet once a task slot is free."""
        self.slots.acquire()
        self._run_slot(function, args)

    def spawn_in_slot(self, function: Callable[..., None], *args: Any) -> None:
        """Start ``function`` in its own greenlet once a task slot is free."""
        self.slots.acquire()
        self._spawn_reusing(self._run_slot, function, args)

    def _spawn_reusing(self, function: Callable[..., Any], *args: Any) -> None:
        # A new greenlet costs an mmap and munmap of its frame stack on
        # CPython 3.11+: tasks and connections reuse finished ones.
        if self._idle_runners:
            self._loop.run_callback(self._idle_runners.pop().switch, function, args)
        else:
            gevent.spawn_raw(self._runner, function, args)

    def _runner(self, function: Callable[..., Any], args: tuple[Any, ...]) -> None:
        runner = greenlet.getcurrent()
        hub = gevent.get_hub()
        while True:
            self._busy_runners += 1
            if self._busy_runners > self._peak_busy_runners:
                self._peak_busy_runners = self._busy_runners
            try:
                function(*args)
            except Exception:
                log.exception("worker %d: unexpected error", os.getpid())
            finally:
                self._busy_runners -= 1
            function = args = None  # type: ignore[assignment]  # no references while idle
            self._idle_runners.append(runner)
            function, args = hub.switch()

    def _run_slot(self, function: Callable[..., None], args: tuple[Any, ...]) -> None:
        current = greenlet.getcurrent()
        tasks = self.tasks
        tasks.add(current)
        self._no_tasks.clear()
        slot = self.slot
        slot.set(scoreboard.INFLIGHT, len(tasks))
        try:
            function(*args)
        finally:
            tasks.discard(current)
            slot.set(scoreboard.INFLIGHT, len(tasks))
            self.slots.release()
            if not self.tasks:
                self._no_tasks.set()
        if self.max_tasks and slot.get(scoreboard.DONE) + slot.get(scoreboard.FAILED) + \
                slot.get(scoreboard.TIMED_OUT) >= self.max_tasks:
            self.request_recycle(f"it has run max_tasks_per_child ({self.max_tasks}) tasks")

    def run_task(self, request: Request, function: Callable[..., Any],
                 sink: Callable[[Any], None] | None) -> bytes:
        """Run one task; return its final reply line."""
        seconds = self._task_timeout
        if request.timeout is not None:
            seconds = min(seconds, request.timeout)
        if self.measure_durations:
            started = time.monotonic()
            try:
                return self._run_task_bounded(request, function, sink, seconds)
            finally:
                self.slot.observe(time.monotonic() - started)
        return self._run_task_bounded(request, function, sink, seconds)

    def _run_task_bounded(self, request: Request, function: Callable[..., Any],
                          sink: Callable[[Any], None] | None, seconds: float) -> bytes:
        current = greenlet.getcurrent()
        if seconds < COARSE_TIMEOUT_MIN:
            limit: BaseException = gevent.Timeout(seconds)
            limit.start()  # type: ignore[attr-defined]
        else:
            limit = _Expired()
            self._deadlines[current] = (time.monotonic() + seconds, limit)
        try:
            if sink is None:
                result = call_task(function, request.args)
            else:
                with progress_sink(sink):
                    result = call_task(function, request.args)
        except (gevent.Timeout, _Expired) as exc:
            if exc is not limit:
                raise
            self.slot.count_task(request.function, scoreboard.TIMED_OUT)
            return encode_error(request.id, TaskTimeout(
                f"task {request.function!r} ran longer than {seconds:g} s and was stopped; "
                "raise the request's timeout or [worker] task_timeout, or make the task "
                "shorter"))
        except RemoteError as exc:
            self.slot.count_task(request.function, scoreboard.FAILED)
            return encode_error(request.id, exc)
        except (Exception, SystemExit) as exc:
            self.slot.count_task(request.function, scoreboard.FAILED)
            return encode_error(request.id, self._task_error(request, exc))
        finally:
            if isinstance(limit, gevent.Timeout):
                limit.close()
            else:
                del self._deadlines[current]
        try:
            line = encode_result(request.id, result)
        except (TypeError, OverflowError) as exc:
            self.slot.count_task(request.function, scoreboard.FAILED)
            return encode_error(request.id, TaskError(
                f"task {request.function!r} returned a value that is not JSON ({exc}); "
                "return dicts, lists, strings, numbers, booleans or None"))
        self.slot.count_task(request.function, scoreboard.DONE)
        return line

    def _task_error(self, request: Request, exc: BaseException) -> TaskError:
        log.warning("task %r raised %s: %s", request.function, type(exc).__name__, exc,
                    exc_info=log.isEnabledFor(logging.DEBUG))
        message = f"{type(exc).__name__}: {exc}"
        if self.config.worker.debug:
            message += "\n" + "".join(traceback.format_exception(exc))
        return TaskError(message)

    def serve_forever(self) -> None:
        """Serve until a signal stops this process."""
        gevent.signal_handler(signal.SIGTERM, self.stop_gracefully)
        gevent.signal_handler(signal.SIGINT, self.stop_now)
        gevent.signal_handler(signal.SIGQUIT, self.stop_now)
        gevent.signal_handler(signal.SIGUSR1, reopen_log_files)
        # The master forked this process with these blocked: one that came
        # while it booted is delivered now, to the handlers above.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_SIGNALS)
        self.server.start()
        self.slot.set(scoreboard.PID, os.getpid())
        self.slot.beat()
        self.slot.set_state(scoreboard.READY)
        heart = gevent.spawn(self._beat_forever)
        sweep = self._loop.timer(DEADLINE_SWEEP_INTERVAL, DEADLINE_SWEEP_INTERVAL)
        sweep.start(self._expire_tasks)
        log.info("%s worker %d serving", self.config.worker.name, os.getpid())
        self._stopped.wait()
        sweep.stop()
        heart.kill()

    def _beat_forever(self) -> None:
        # The master kills a worker whose heartbeat stops: this greenlet only
        # runs when the event loop does.
        interval = min(HEARTBEAT_INTERVAL, self.config.worker.heartbeat_timeout / 4)
        max_memory = self.config.worker.max_memory_per_child
        idle_timeout = self.config.worker.idle_timeout
        while True:
            self.slot.beat()
            self._trim_idle_runners()
            now = time.monotonic()
            for connection in list(self.connections):
                connection.check_idle(now, idle_timeout)
            if os.getppid() != self.master_pid:
                log.error("master %d is gone; worker %d exits", self.master_pid, os.getpid())
                self.stop_now()
            rss = resident_memory()
            self.slot.set(scoreboard.RSS, rss)
            if max_memory and rss > max_memory:
                self.request_recycle(f"its RSS ({rss >> 20} MiB) is over max_memory_per_child "
                                     f"({max_memory >> 20} MiB)")
            gevent.sleep(interval)

    def _expire_tasks(self) -> None:
        # Runs in the hub, like gevent.Timeout's own timers: every task in
        # _deadlines is suspended inside its task, so the throw lands there.
        now = time.monotonic()
        for task_greenlet, (deadline, expired) in list(self._deadlines.items()):
            if now >= deadline and self._deadlines.get(task_greenlet, (0, None))[1] is expired:
                task_greenlet.throw(expired)

    def _trim_idle_runners(self) -> None:
        keep = max(IDLE_RUNNERS_FLOOR, self._peak_busy_runners)
        self._peak_busy_runners = self._busy_runners
        while len(self._idle_runners) > keep:
            gevent.kill(self._idle_runners.pop(0))

    def request_recycle(self, reason: str) -> None:
        """Ask the master for a replacement; this process serves until it is told to drain."""
        if self.slot.state == scoreboard.READY:
            log.info("worker %d asks to be replaced: %s", os.getpid(), reason)
            self.slot.set_state(scoreboard.RECYCLE)

    def stop_gracefully(self) -> None:
        """Stop accepting, let in-flight tasks finish within graceful_timeout, then stop."""
        if self.draining:
            return
        self.draining = True
        self.slot.set_state(scoreboard.DRAINING)
        gevent.spawn(self._drain)

    def _drain(self) -> None:
        self.server.close()
        grace = self.config.worker.graceful_timeout
        deadline = time.monotonic() + grace
        log.info("worker %d draining %d task(s), up to %g s", os.getpid(), len(self.tasks),
                 grace)
        # Pipelining peers are told, and close once their replies are in: a
        # request they send meanwhile is answered (ShuttingDown), never lost.
        for connection in list(self.connections):
            if connection.uses_ids:
                connection.send(encode_closing())
        if not self._no_tasks.wait(timeout=grace):
            log.warning("worker %d: %d task(s) still running after %g s; killing them",
                        os.getpid(), len(self.tasks), grace)
            for task_greenlet in list(self.tasks):
                gevent.kill(task_greenlet)
        for runner in self._idle_runners:
            gevent.kill(runner)
        for connection in list(self.connections):
            if not connection.uses_ids:
                connection.stop_reading()
        while self.connections and time.monotonic() < deadline:
            gevent.sleep(DRAIN_POLL_INTERVAL)
        for connection in list(self.connections):
            connection.stop_reading()
        self.server.stop(timeout=1.0)
        self._stopped.set()

    def stop_now(self) -> None:
        """Exit at once; connections close and their callers see WorkerLost."""
        logging.shutdown()
        os._exit(0)
