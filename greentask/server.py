"""One worker process: serve the listener it inherited with a gevent ``StreamServer``.

Theory of operation
-------------------
Each accepted connection gets a reader greenlet (the ``StreamServer``
handler). It feeds received bytes to the protocol's :class:`LineDecoder`,
answers bad lines at once and runs each valid request in one of the process's
``concurrency`` task slots: a request with an ``id`` in a new greenlet, one
without an ``id`` in the reader itself, so it is answered before the next line
is read. When every slot is busy the reader waits, so the peer's requests wait
in TCP buffers (backpressure) instead of being dropped.

Task greenlets never block on the socket: they queue their reply in the
connection's :class:`ReplyWriter`, which sends what one loop turn queued in
one write. A peer that does not read its replies blocks only its own writer;
when its queue passes :data:`OUTBOX_HIGH_WATER` its reader stops reading.

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
import greenlet
from gevent.event import Event
from gevent.lock import Semaphore
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
#: Idle task greenlets kept for reuse (each holds about 20 KiB).
MAX_IDLE_RUNNERS = 128
#: How often the worker checks that its master is still alive (seconds).
PARENT_CHECK_INTERVAL = 1.0


class ReplyWriter:
    """The outbound half of a connection: queue reply lines, send them in batches.

    Replies queued during one turn of the event loop go out in one
    non-blocking write at the end of that turn (a loop callback, no greenlet
    switch). What the socket does not take is sent by a writer greenlet,
    started only then, which waits for the peer to read.
    """

    def __init__(self, sock: socket.socket, on_drop: Callable[[int], None]) -> None:
        self.sock = sock
        self.broken = False
        #: Unsent bytes; the reader stops reading above OUTBOX_HIGH_WATER.
        self.size = 0
        #: Set while the peer can take more replies (size under the high water).
        self.writable = Event()
        self.writable.set()
        self._fd = sock.fileno()
        self._on_drop = on_drop
        self._outbox: list[bytes] = []
        self._flush_scheduled = False
        self._writer: gevent.Greenlet | None = None
        self._loop = gevent.get_hub().loop
        self._flushed = Event()
        self._flushed.set()

    def send(self, data: bytes) -> None:
        """Queue ``data``; dropped (and counted) once the peer is gone."""
        if self.broken:
            self._on_drop(data.count(b"\n"))
            return
        self._outbox.append(data)
        self.size += len(data)
        self._flushed.clear()
        if self.size > OUTBOX_HIGH_WATER:
            self.writable.clear()
        if not self._flush_scheduled and self._writer is None:
            self._flush_scheduled = True
            self._loop.run_callback(self._flush_without_blocking)

    def wait_flushed(self) -> None:
        """Block until everything queued is sent (or the peer is gone)."""
        self._flushed.wait()

    def _take(self) -> bytes:
        data = b"".join(self._outbox) if len(self._outbox) > 1 else self._outbox[0]
        self._outbox = []
        self.size = 0
        return data

    def _flush_without_blocking(self) -> None:
        # Runs in the hub: it must not block or raise.
        self._flush_scheduled = False
        if not self._outbox or self._writer is not None:
            return
        data = self._take()
        try:
            sent = os.write(self._fd, data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._fail(data, exc)
            return
        if sent < len(data):
            self._outbox.insert(0, data[sent:])
            self.size += len(data) - sent
            self._writer = gevent.spawn(self._write_loop)
            return
        self._sent()

    def _write_loop(self) -> None:
        while self._outbox:
            data = self._take()
            try:
                self.sock.sendall(data)
            except OSError as exc:
                self._fail(data, exc)
                break
            self._sent()
        self._writer = None

    def _sent(self) -> None:
        if self.size <= OUTBOX_HIGH_WATER:
            self.writable.set()
        if not self._outbox:
            self._flushed.set()

    def _fail(self, data: bytes, exc: OSError) -> None:
        self.broken = True
        self._on_drop(data.count(b"\n") + sum(d.count(b"\n") for d in self._outbox))
        self._outbox = []
        self.size = 0
        self.writable.set()
        self._flushed.set()
        log.debug("peer went away, replies dropped: %s", exc)


class Connection:
    """One peer: read request lines, start their tasks, send the replies."""

    def __init__(self, worker: Worker, sock: socket.socket) -> None:
        self.worker = worker
        self.sock = sock
        self.decoder = LineDecoder(worker.config.worker.max_line)
        self.writer = ReplyWriter(sock, worker.count_dropped)
        self.send = self.writer.send
        self.inflight = 0
        self._idle = Event()
        self._idle.set()

    def serve(self) -> None:
        """Run until the peer closes (or half-closes) and every reply is sent."""
        try:
            self._read_loop()
        finally:
            # A peer that half-closed after sending still gets its replies.
            self._idle.wait()
            self.writer.wait_flushed()
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
        writable = self.writer.writable
        while not self.writer.broken:
            writable.wait()
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
        if request.id is None:
            # Answered before the next line is read anyway: run it right here.
            self.worker.run_in_slot(self._run_task, request, function)
        else:
            self.worker.spawn_in_slot(self._run_task, request, function)

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


class Worker:
    """A worker process's server: the shared listener, the task pool, the drain."""

    def __init__(self, listener: socket.socket, config: Config, registry: Registry,
                 master_pid: int) -> None:
        self.config = config
        self.registry = registry
        self.master_pid = master_pid
        #: One slot per task that may run at once; a reader that cannot get
        #: one stops reading (backpressure).
        self.slots = Semaphore(config.worker.concurrency)
        self.tasks: set[greenlet.greenlet] = set()
        self._idle_runners: list[greenlet.greenlet] = []
        self._loop = gevent.get_hub().loop
        self._no_tasks = Event()
        self._no_tasks.set()
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
        if self._idle_runners:
            runner = self._idle_runners.pop()
            self._loop.run_callback(runner.switch, function, args)
        else:
            gevent.spawn_raw(self._run_jobs, function, args)

    def _run_jobs(self, function: Callable[..., None], args: tuple[Any, ...]) -> None:
        # A runner greenlet is reused for many tasks: a new greenlet costs an
        # mmap and munmap of its frame stack on CPython 3.11+, per task.
        runner = greenlet.getcurrent()
        hub = gevent.get_hub()
        while True:
            self._run_slot(function, args)
            if len(self._idle_runners) >= MAX_IDLE_RUNNERS:
                return
            self._idle_runners.append(runner)
            function, args = hub.switch()

    def _run_slot(self, function: Callable[..., None], args: tuple[Any, ...]) -> None:
        current = greenlet.getcurrent()
        self.tasks.add(current)
        self._no_tasks.clear()
        try:
            function(*args)
        finally:
            self.tasks.discard(current)
            self.slots.release()
            if not self.tasks:
                self._no_tasks.set()

    def run_task(self, request: Request, function: Callable[..., Any],
                 sink: Callable[[Any], None] | None) -> bytes:
        """Run one task; return its final reply line."""
        seconds = self.config.worker.task_timeout
        if request.timeout is not None:
            seconds = min(seconds, request.timeout)
        timeout = gevent.Timeout(seconds)
        timeout.start()
        try:
            if sink is None:
                result = call_task(function, request.args)
            else:
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
        log.info("%s worker %d serving", self.config.worker.name, os.getpid())
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
        log.info("worker %d draining %d task(s), up to %g s", os.getpid(), len(self.tasks),
                 grace)
        if not self._no_tasks.wait(timeout=grace):
            log.warning("worker %d: %d task(s) still running after %g s; killing them",
                        os.getpid(), len(self.tasks), grace)
            for task_greenlet in list(self.tasks):
                gevent.kill(task_greenlet)
        for runner in self._idle_runners:
            gevent.kill(runner)
        for connection in list(self.connections):
            connection.stop_reading()
        self.server.stop(timeout=1.0)
        self._stopped.set()

    def stop_now(self) -> None:
        """Exit at once; connections close and their callers see WorkerLost."""
        logging.shutdown()
        os._exit(0)
