"""One worker process: serve the listener it inherited with a gevent ``StreamServer``.

Theory of operation
-------------------
Each accepted connection gets a reader greenlet (the ``StreamServer``
handler) and a writer greenlet. The reader feeds received bytes to the
protocol's :class:`LineDecoder`, answers bad lines at once and starts each
valid request as a greenlet in the process-wide task pool. A full pool blocks
the reader, so the peer's requests wait in TCP buffers (backpressure) instead
of being dropped. A request without an ``id`` is awaited before the next line
is read, so such callers get their replies in order.

Task greenlets never write to the socket: they put their reply in the
connection's outbox and the writer sends everything queued in one ``sendall``.
A peer that does not read its replies therefore blocks only its own writer;
when its outbox passes :data:`OUTBOX_HIGH_WATER` its reader stops reading.

On SIGTERM the process stops accepting, answers new requests with
``ShuttingDown``, lets in-flight tasks finish within ``graceful_timeout``,
flushes their replies and exits. SIGINT and SIGQUIT exit at once.

This module imports gevent, so only a forked child imports it, after it has
monkey-patched (see :mod:`greentask.arbiter`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import traceback
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event
from gevent.pool import Pool
from gevent.server import StreamServer

from greentask.config import Config
from greentask.errors import BadRequest, RemoteError, ShuttingDown, TaskError, TaskTimeout
from greentask.protocol import (
    LineDecoder,
    Request,
    encode_error,
    encode_progress,
    encode_result,
    parse_request,
)
from greentask.registry import Registry, call_task, progress_sink

log = logging.getLogger("greentask.worker")

#: Bytes read per ``recv``; also the most one read adds to a connection's buffer.
RECV_SIZE = 64 * 1024
#: Unsent reply bytes at which a connection stops reading requests, until its
#: peer reads its replies.
OUTBOX_HIGH_WATER = 4 * 1024 * 1024
#: How long a connection closed for a too-long line keeps discarding input (seconds).
LINGER_SECONDS = 2.0
#: How often the worker checks that its master is still alive (seconds).
PARENT_CHECK_INTERVAL = 1.0


class Connection:
    """One peer: read request lines, start their tasks, send the replies."""

    def __init__(self, worker: Worker, sock: socket.socket) -> None:
        self.worker = worker
        self.sock = sock
        self.decoder = LineDecoder(worker.config.worker.max_line)
        self.inflight = 0
        self._idle = Event()
        self._idle.set()
        self._outbox: list[bytes] = []
        self._outbox_size = 0
        self._wake_writer = Event()
        self._writable = Event()
        self._writable.set()
        self._reading_done = False
        self._broken = False

    def serve(self) -> None:
        """Run until the peer closes (or half-closes) and every reply is sent."""
        writer = gevent.spawn(self._write_loop)
        try:
            self._read_loop()
        finally:
            # A peer that half-closed after sending still gets its replies.
            self._idle.wait()
            self._reading_done = True
            self._wake_writer.set()
            writer.join()
            if self.decoder.too_large:
                self._linger()

    def _linger(self) -> None:
        # Closing with unread input sends a reset, which can destroy the
        # TooLarge reply before the peer reads it: send FIN, then discard what
        # the peer is still sending for a bounded time.
        try:
            self.sock.shutdown(socket.SHUT_WR)
            with gevent.Timeout(LINGER_SECONDS, False):
                while self.sock.recv(RECV_SIZE):
                    pass
        except OSError:
            pass

    def stop_reading(self) -> None:
        """Make the reader see end of input (used when the process drains)."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def _read_loop(self) -> None:
        while not self._broken:
            self._writable.wait()
            try:
                data = self.sock.recv(RECV_SIZE)
            except OSError:
                return
            if not data:
                return
            for line in self.decoder.feed(data):
                self._handle_line(line)
            if self.decoder.too_large:
                self.send(encode_error(None, self.decoder.too_large_error()))
                return

    def _handle_line(self, line: bytes) -> None:
        try:
            request = parse_request(line)
        except BadRequest as exc:
            self.send(encode_error(exc.request_id, exc))
            return
        if self.worker.draining:
            self.send(encode_error(request.id, ShuttingDown(
                "this worker process is shutting down; the task was not run, send it again "
                "(on a new connection)")))
            return
        try:
            function = self.worker.registry.lookup(request.function)
        except RemoteError as exc:
            self.send(encode_error(request.id, exc))
            return
        self.inflight += 1
        self._idle.clear()
        greenlet = self.worker.pool.spawn(self._run_task, request, function)
        if request.id is None:
            greenlet.join()

    def _run_task(self, request: Request, function: Callable[..., Any]) -> None:
        try:
            self.send(self.worker.run_task(request, function, self._progress_sink(request)))
        finally:
            self.inflight -= 1
            if not self.inflight:
                self._idle.set()

    def _progress_sink(self, request: Request) -> Callable[[Any], None] | None:
        if not request.progress:
            return None
        return lambda value: self.send(encode_progress(request.id, value))

    def send(self, data: bytes) -> None:
        """Queue ``data`` for the writer; dropped (and counted) once the peer is gone."""
        if self._broken:
            self.worker.replies_dropped += 1
            return
        self._outbox.append(data)
        self._outbox_size += len(data)
        self._wake_writer.set()
        if self._outbox_size > OUTBOX_HIGH_WATER:
            self._writable.clear()

    def _write_loop(self) -> None:
        while True:
            self._wake_writer.wait()
            self._wake_writer.clear()
            if self._outbox and not self._flush():
                return
            if self._reading_done and not self._outbox:
                return

    def _flush(self) -> bool:
        """Send everything queued; False when the peer is gone."""
        data = b"".join(self._outbox) if len(self._outbox) > 1 else self._outbox[0]
        self._outbox = []
        self._outbox_size = 0
        try:
            self.sock.sendall(data)
        except OSError as exc:
            self._broken = True
            self._writable.set()
            self.worker.replies_dropped += data.count(b"\n")
            log.debug("peer went away, replies dropped: %s", exc)
            return False
        if self._outbox_size <= OUTBOX_HIGH_WATER:
            self._writable.set()
        return True


class Worker:
    """A worker process's server: the shared listener, the task pool, the drain."""

    def __init__(self, listener: socket.socket, config: Config, registry: Registry,
                 master_pid: int) -> None:
        self.config = config
        self.registry = registry
        self.master_pid = master_pid
        self.pool = Pool(config.worker.concurrency)
        self.server = StreamServer(listener, self.handle_connection)
        # Several processes share this listener: take one connection per wake-up
        # so a busy process does not grab a burst that idle siblings could serve.
        self.server.max_accept = 1
        self.connections: set[Connection] = set()
        self.draining = False
        self.replies_dropped = 0
        self._stopped = Event()

    def handle_connection(self, sock: socket.socket, address: Any) -> None:
        """StreamServer handler: serve one connection until it ends."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = Connection(self, sock)
        self.connections.add(connection)
        try:
            connection.serve()
        finally:
            self.connections.discard(connection)

    def run_task(self, request: Request, function: Callable[..., Any],
                 sink: Callable[[Any], None] | None) -> bytes:
        """Run one task; return its final reply line."""
        seconds = self.config.worker.task_timeout
        if request.timeout is not None:
            seconds = min(seconds, request.timeout)
        timeout = gevent.Timeout(seconds)
        timeout.start()
        try:
            with progress_sink(sink):
                result = call_task(function, request.args)
        except gevent.Timeout as exc:
            if exc is not timeout:
                raise
            return encode_error(request.id, TaskTimeout(
                f"task {request.function!r} ran longer than {seconds:g} s and was stopped; "
                "raise the request's timeout or [worker] task_timeout, or make the task "
                "shorter"))
        except RemoteError as exc:
            return encode_error(request.id, exc)
        except (Exception, SystemExit) as exc:
            return encode_error(request.id, self._task_error(request, exc))
        finally:
            timeout.close()
        try:
            return encode_result(request.id, result)
        except (TypeError, OverflowError) as exc:
            return encode_error(request.id, TaskError(
                f"task {request.function!r} returned a value that is not JSON ({exc}); "
                "return dicts, lists, strings, numbers, booleans or None"))

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
        self.server.start()
        watcher = gevent.spawn(self._watch_master)
        log.info("worker %d serving", os.getpid())
        self._stopped.wait()
        watcher.kill()

    def _watch_master(self) -> None:
        while True:
            gevent.sleep(PARENT_CHECK_INTERVAL)
            if os.getppid() != self.master_pid:
                log.error("master %d is gone; worker %d exits", self.master_pid, os.getpid())
                self.stop_now()

    def stop_gracefully(self) -> None:
        """Stop accepting, let in-flight tasks finish within graceful_timeout, then stop."""
        if self.draining:
            return
        self.draining = True
        gevent.spawn(self._drain)

    def _drain(self) -> None:
        self.server.close()
        grace = self.config.worker.graceful_timeout
        log.info("worker %d draining %d task(s), up to %g s", os.getpid(), len(self.pool),
                 grace)
        if not self.pool.join(timeout=grace):
            log.warning("worker %d: %d task(s) still running after %g s; killing them",
                        os.getpid(), len(self.pool), grace)
            self.pool.kill(block=False)
        for connection in list(self.connections):
            connection.stop_reading()
        self.server.stop(timeout=1.0)
        self._stopped.set()

    def stop_now(self) -> None:
        """Exit at once; connections close and their callers see WorkerLost."""
        logging.shutdown()
        os._exit(0)
