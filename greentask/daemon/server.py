"""One worker process: serve the listener it inherited with a gevent ``StreamServer``.

Theory of operation
-------------------
Each accepted connection is a :class:`~greentask.daemon.connection.Connection`,
served by a reader greenlet; its requests run in the process's
:class:`~greentask.daemon.runner.TaskRunner`, which owns the task permits,
greenlet reuse, deadlines and outcome counting. This module does what is
process-wide: admission (the open-socket cap, TLS), the heartbeat, recycling
and the drain.

On SIGTERM the process stops accepting, tells pipelining peers (and those
that sent nothing yet) it is closing (``{"closing": true}``), answers new
requests with ``ShuttingDown``, lets in-flight tasks finish within
``graceful_timeout``, gives those peers ``closing_grace`` to close (then
closes them), and exits. SIGINT and SIGQUIT exit at once.
The process beats a heartbeat and keeps its counters in its scoreboard slot
(:mod:`greentask.daemon.scoreboard`); the master reads them.

The master imports this module for its children after monkey-patching (see
:func:`greentask.daemon.preload.prepare_master`); only the children run it.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.socket
from gevent.event import Event
from gevent.monkey import get_original
from gevent.server import StreamServer

from greentask.config import Config
from greentask.daemon import scoreboard
from greentask.daemon.activity import ChildActivity
from greentask.daemon.admission import Admission, ConnectionLimits, PeerOverLimit
from greentask.daemon.connection import Connection
from greentask.daemon.lifecycle import WORKER_SIGNALS
from greentask.daemon.logs import reopen_log_files
from greentask.daemon.runner import TaskRunner
from greentask.daemon.spread import AcceptSpread, step_aside
from greentask.daemon.writer import linger
from greentask.errors import BadRequest, RemoteError, ShuttingDown
from greentask.protocol import encode_error
from greentask.refusals import RefusalCounter
from greentask.registry import Registry

log = logging.getLogger("greentask.worker")

#: Longest time between two heartbeats; each also checks that the master lives
#: and reads the RSS (seconds).
HEARTBEAT_INTERVAL = 1.0
#: Longest TLS handshake; a peer that takes longer is disconnected (seconds).
HANDSHAKE_TIMEOUT = 10.0
#: How often a draining worker checks whether its peers have closed (seconds).
DRAIN_POLL_INTERVAL = 0.05
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: The standard library's poll, for a look at the listener that never waits.
poll_original = get_original("select", "poll")


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
                 ssl_context: ssl.SSLContext | None = None,
                 spread: AcceptSpread | None = None,
                 activity: ChildActivity | None = None) -> None:
        self.config = config
        self.master_pid = master_pid
        #: This process's row in the master's scoreboard (state, counters, heartbeat).
        self.slot = slot
        settings = config.worker
        self.runner = TaskRunner(
            registry, slot, concurrency=settings.concurrency, task_timeout=settings.task_timeout,
            max_tasks=max_tasks, measure_durations=settings.metrics_bind is not None,
            debug=settings.debug, on_recycle=self.request_recycle,
            cancel_grace=settings.cancel_grace)
        self.limits = ConnectionLimits.from_settings(settings)
        self.server = StreamServer(listener, self.handle_connection, spawn=self._accepted)
        self._max_connections = settings.max_connections
        self._max_per_peer = settings.max_connections_per_peer
        self._closing_grace = settings.closing_grace
        #: Open connections by peer address (only with max_connections_per_peer).
        self._per_peer: dict[str, int] = {}
        self._open_sockets = 0
        #: Connections closed to make room that have not ended yet.
        self._leaving = 0
        #: Not accepting: every connection is busy (until one is idle or closes).
        self._full = False
        #: Not accepting for a moment: leaving new connections to siblings.
        self._aside = False
        #: Balances connections with the sibling processes (None: alone, or in a test).
        self.spread = spread
        #: Where the heartbeat publishes the running tasks and failures for the
        #: dashboard and reads its cancels (None: in a test without a master).
        self.activity = activity
        self._waiting = poll_original()
        self._waiting.register(listener.fileno(), select.POLLIN)
        #: TLS on the task port (``[worker] certfile``), or None.
        self.ssl_context = ssl_context
        self._refusals = RefusalCounter(log, f"worker {os.getpid()}: connection")
        # Several processes share this listener: take one connection per wake-up
        # so a busy process does not grab a burst that idle siblings could serve.
        self.server.max_accept = 1
        #: Open connections, oldest first (a dict used as an ordered set).
        self.connections: dict[Connection, None] = {}
        self.draining = False
        #: What requests are answered with instead of running, once draining.
        self.refusal: RemoteError | None = None
        self._stopped = Event()

    def _accepted(self, function: Callable[..., None], *args: Any) -> None:
        # StreamServer's spawn, called in the hub as soon as a connection is
        # accepted: the count must include it before the next accept.
        self._open_sockets += 1
        self.slot.add(scoreboard.CONNECTIONS)
        if (self.spread is not None and not self._aside
                and self.spread.over_share(time.monotonic())):
            self._aside = True
            self._stop_accepting()
            self.runner.spawn(self._step_aside)
        self.runner.spawn(function, *args)

    def handle_connection(self, sock: socket.socket, address: Any) -> None:
        """StreamServer handler: serve one connection until it ends.

        TCP_NODELAY is set on the listener, and accepted sockets inherit it.
        """
        opened_at = time.monotonic()
        if self._open_sockets - self._leaving > self._max_connections:
            self._make_room()  # none idle: this one is served one over the cap
        if self._open_sockets - self._leaving >= self._max_connections and (
                self._open_sockets >= 2 * self._max_connections or not self._any_evictable()):
            # Full of busy connections: stop accepting; the kernel queues new
            # connections for this process's siblings (or until one is idle).
            self._full = True
            self._stop_accepting()
        try:
            self._serve_socket(sock, str(address[0]) if address else "?")
        finally:
            self._open_sockets -= 1
            self.slot.add(scoreboard.CONNECTIONS, -1)
            if self.spread is not None:
                now = time.monotonic()
                self.spread.closed(now - opened_at, now)
            if self._full:
                self._full = False
                self._resume_accepting()

    def _resume_accepting(self) -> None:
        if not (self.draining or self._full or self._aside):
            self.server.start_accepting()
            self.slot.set(scoreboard.ACCEPTING, 1)

    def _stop_accepting(self) -> None:
        # Siblings read ACCEPTING: none leaves a connection to this process now.
        self.slot.set(scoreboard.ACCEPTING, 0)
        self.server.stop_accepting()

    def _step_aside(self) -> None:
        assert self.spread is not None
        try:
            step_aside(self.spread, self._connection_waiting, gevent.sleep)
        finally:
            self._aside = False
            self._resume_accepting()

    def _connection_waiting(self) -> bool:
        return bool(self._waiting.poll(0))

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

    def _make_room(self) -> bool:
        """Close the oldest idle connection so a new client is served; False if none is."""
        for connection in self.connections:
            if connection.evictable:
                # To the back, so the next search starts at fresh candidates.
                del self.connections[connection]
                self.connections[connection] = None
                connection.evict(self._closing_grace)
                self._leaving += 1
                return True
        return False

    def _any_evictable(self) -> bool:
        return any(connection.evictable for connection in self.connections)

    def _serve_connection(self, sock: socket.socket, peer: str) -> None:
        admission: Admission = self
        if self._max_per_peer:
            count = self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
            if count > self._max_per_peer:
                self.note_refused(peer, "too many connections from it")
                admission = PeerOverLimit(peer, self._max_per_peer)
        connection = Connection(sock, peer, self.limits, self.runner, admission)
        if admission is not self:
            connection.ask_to_close(grace=self._closing_grace)
        self.connections[connection] = None
        try:
            connection.serve()
        finally:
            del self.connections[connection]
            if connection.evicted:
                self._leaving -= 1
            if self._max_per_peer:
                self._per_peer[peer] -= 1
                if not self._per_peer[peer]:
                    del self._per_peer[peer]

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
                    "this task port speaks TLS only; connect with TLS (greentask call --tls "
                    "or --ca-certs FILE, [gateway] tls = true, or TaskClient(ssl_context="
                    "greentask.tls.client_context(...)))")))
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
        self._refusals.note(peer, reason)

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
        self.slot.set(scoreboard.ACCEPTING, 1)
        self.slot.set(scoreboard.PID, os.getpid())
        self.slot.beat()
        self.slot.set_state(scoreboard.READY)
        heart = gevent.spawn(self._beat_forever)
        self.runner.sweep.start()
        log.info("%s worker %d serving", self.config.worker.name, os.getpid())
        self._stopped.wait()
        self.runner.sweep.stop()
        heart.kill()

    def _beat_forever(self) -> None:
        # The master kills a worker whose heartbeat stops: this greenlet only
        # runs when the event loop does.
        interval = min(HEARTBEAT_INTERVAL, self.config.worker.heartbeat_timeout / 4)
        max_memory = self.config.worker.max_memory_per_child
        idle_timeout = self.config.worker.idle_timeout
        while True:
            self.slot.beat()
            self.runner.greenlets.trim_idle()
            if self.activity is not None:
                self._trade_activity()
            now = time.monotonic()
            for connection in list(self.connections):
                connection.check_idle(now, idle_timeout)
            if self._full and self._any_evictable():
                # Full of busy connections before; one is idle now: let a
                # waiting client in (its accept makes the room).
                self._full = False
                self._resume_accepting()
            if os.getppid() != self.master_pid:
                log.error("master %d is gone; worker %d exits", self.master_pid, os.getpid())
                self.stop_now()
            rss = resident_memory()
            self.slot.set(scoreboard.RSS, rss)
            if max_memory and rss > max_memory:
                self.request_recycle(f"its RSS ({rss >> 20} MiB) is over max_memory_per_child "
                                     f"({max_memory >> 20} MiB)")
            gevent.sleep(interval)

    def _trade_activity(self) -> None:
        # Never let the dashboard's part stop the heartbeat: the master would
        # take this worker for hung.
        try:
            for key in self.activity.new_cancels():
                self.runner.cancel_key(key)
            self.activity.publish(self.runner.activity())
        except Exception:
            log.exception("worker %d: cannot publish its activity for the dashboard",
                          os.getpid())

    def request_recycle(self, reason: str) -> None:
        """Ask the master for a replacement; this process serves until it is told to drain."""
        if self.slot.state == scoreboard.READY:
            log.info("worker %d asks to be replaced: %s", os.getpid(), reason)
            self.slot.set_state(scoreboard.RECYCLE)
            if os.getppid() == self.master_pid:
                # Wake the master now, not at its next pass (half a second of
                # tasks later): max_tasks_per_child means about that many.
                os.kill(self.master_pid, signal.SIGUSR2)

    def stop_gracefully(self) -> None:
        """Stop accepting, let in-flight tasks finish within graceful_timeout, then stop."""
        if self.draining:
            return
        self.draining = True
        self.refusal = ShuttingDown(
            "this worker process is shutting down; the task was not run, send it again (on a "
            "new connection)")
        self.slot.set_state(scoreboard.DRAINING)
        gevent.spawn(self._drain)

    def _drain(self) -> None:
        self.slot.set(scoreboard.ACCEPTING, 0)
        self.server.close()
        settings = self.config.worker
        grace = settings.graceful_timeout
        deadline = time.monotonic() + grace
        runner = self.runner
        log.info("worker %d draining %d task(s), up to %g s", os.getpid(), len(runner.running),
                 grace)
        # Pipelining peers (and those that sent nothing yet) are told, and
        # close once their replies are in: a request they send meanwhile is
        # answered (ShuttingDown), never lost. Id-less peers are closed once
        # their request is answered.
        now = time.monotonic()
        for connection in list(self.connections):
            connection.begin_drain(now, settings.closing_grace)
        if not runner.wait_idle(grace):
            log.warning("worker %d: %d task(s) still running after %g s; killing them",
                        os.getpid(), len(runner.running), grace)
            runner.kill_all()
        runner.greenlets.kill_idle()
        # A peer told closing that keeps its idle socket open is closed after
        # closing_grace: the stop ends when the work is done, not at the deadline.
        while self.connections and time.monotonic() < deadline:
            now = time.monotonic()
            for connection in list(self.connections):
                connection.check_asked(now)
            gevent.sleep(DRAIN_POLL_INTERVAL)
        for connection in list(self.connections):
            connection.close_now()
        self.server.stop(timeout=1.0)
        self._stopped.set()

    def stop_now(self) -> None:
        """Exit at once; connections close and their callers see WorkerLost."""
        logging.shutdown()
        os._exit(0)
