"""One client connection of a worker: read request lines, run their tasks, send the replies.

Theory of operation
-------------------
A :class:`Connection` is served by one reader greenlet (the worker's
``StreamServer`` handler). It feeds received bytes to the protocol's
:class:`~greentask.protocol.LineDecoder`, answers bad lines at once and runs
each valid request in one of the worker's task slots: a request with an
``id`` in another greenlet, one without an ``id`` in the reader itself, so it
is answered before the next line is read. Past
``max_inflight_per_connection`` the reader waits (backpressure).

Replies go through the connection's :class:`~greentask.daemon.writer.ReplyWriter`;
a peer that does not read them blocks only its own writer, and past
:data:`greentask.daemon.writer.OUTBOX_HIGH_WATER` its reader stops reading. Sockets
have no timeouts: the worker's heartbeat calls :meth:`Connection.check_idle`.
"""

from __future__ import annotations

import hmac
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
import gevent.socket
from gevent.event import Event

from greentask.daemon.writer import ReplyWriter
from greentask.errors import BadRequest, RemoteError, ShuttingDown, TaskTimeout, Unauthorized
from greentask.protocol import (
    LineDecoder,
    Request,
    encode_closing,
    encode_error,
    encode_progress,
    parse_hello,
    parse_request,
)

if TYPE_CHECKING:
    from greentask.daemon.server import ProcessServer

#: Bytes read per ``recv``; also the most one read adds to a connection's buffer.
RECV_SIZE = 64 * 1024
#: How long a connection closed on an error keeps discarding input (seconds).
LINGER_SECONDS = 2.0
#: After telling an idle pipelining peer to close, how long to wait for it (seconds).
IDLE_GRACE = 10.0


def shutdown_socket(sock: socket.socket, how: int) -> None:
    """Shut down one direction of ``sock``, keeping its TLS layer (if any) in place."""
    # SSLSocket.shutdown drops the TLS object, so replies still queued would
    # go out in clear text: call the plain socket's method.
    try:
        gevent.socket.socket.shutdown(sock, how)
    except OSError:
        pass


def linger(sock: socket.socket) -> None:
    """Send FIN, then discard what the peer still sends for up to :data:`LINGER_SECONDS`.

    Closing with unread input sends a reset, which can destroy what was sent
    just before (a TooLarge reply, a TLS alert) before the peer reads it.
    """
    shutdown_socket(sock, socket.SHUT_WR)
    try:
        with gevent.Timeout(LINGER_SECONDS, False):
            while sock.recv(RECV_SIZE):
                pass
    except OSError:
        pass


class Connection:
    """One peer: read request lines, start their tasks, send the replies."""

    def __init__(self, worker: ProcessServer, sock: socket.socket, peer: str) -> None:
        self.worker = worker
        self.sock = sock
        self.peer = peer
        #: False until the peer sent the token, when the server requires one.
        self.authenticated = worker.auth_token is None
        #: Set to stop reading: the connection closes once its replies are out.
        self.closing = False
        self._told_closing_at: float | None = None
        self._partial_since: float | None = None
        self.last_active = time.monotonic()
        self._max_inflight = worker.config.worker.max_inflight_per_connection
        self._max_depth = worker.config.worker.max_json_depth
        self._below_limit = Event()
        self._below_limit.set()
        self.decoder = LineDecoder(worker.config.worker.max_line)
        self.writer = ReplyWriter(sock, worker.count_dropped)
        self.send = self.writer.send
        self.inflight = 0
        #: True once the peer sent a request with an id: it pipelines, and is
        #: told before the connection closes.
        self.uses_ids = False
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
                linger(self.sock)

    def stop_reading(self, how: int = socket.SHUT_RD) -> None:
        """Make the reader see end of input (a drain, an idle peer)."""
        shutdown_socket(self.sock, how)

    def _read_loop(self) -> None:
        writable = self.writer.writable
        while not self.writer.broken and not self.closing:
            writable.wait()
            try:
                data = self.sock.recv(RECV_SIZE)
            except OSError:
                return
            if not data:
                return
            self.last_active = time.monotonic()
            for line in self.decoder.feed(data):
                if self.closing:
                    break
                self._handle_line(line)
            if self.decoder.too_large:
                self.send(encode_error(None, self.decoder.too_large_error()))
                return
            if not self.decoder.buffered:
                self._partial_since = None
            elif self._partial_since is None:
                self._partial_since = self.last_active

    def check_idle(self, now: float, limit: float) -> None:
        """Close a peer that stalls (every heartbeat; sockets themselves have no timeout).

        Half a line kept past ``limit`` (slowloris) or silence past ``limit``
        with nothing running closes the connection; a pipelining peer is
        asked to close first. A peer that reads none of its replies for
        ``limit`` is cut off.
        """
        if self.closing:
            return
        if self._partial_since is not None and now - self._partial_since > limit:
            self._close_with(f"a request line stayed incomplete for more than {limit:g} s "
                             "([worker] idle_timeout); the connection is closed")
        elif self.writer.busy and now - self.writer.last_progress > limit:
            self.closing = True
            self.stop_reading(socket.SHUT_RDWR)  # the writer fails; replies are dropped
        elif self.inflight or self.writer.busy or now - self.last_active <= limit:
            return
        elif not self.uses_ids:
            self._close_with(f"no complete request for {limit:g} s ([worker] idle_timeout); "
                             "the connection is closed")
        elif self._told_closing_at is None:
            # A pipelining client keeps connections for reuse: ask it to close,
            # so no request of its is in flight when the connection goes.
            self._told_closing_at = now
            self.send(encode_closing())
        elif now - self._told_closing_at > IDLE_GRACE:
            self._close_with(None)

    def _close_with(self, message: str | None) -> None:
        if message is not None:
            self.send(encode_error(None, TaskTimeout(message)))
        self.closing = True
        self.stop_reading()  # the reader sees the end; replies go out, then it closes

    def _handle_line(self, line: bytes) -> None:
        if not self.authenticated:
            self._authenticate(line)
            return
        try:
            request = parse_request(line, self._max_depth)
        except BadRequest as exc:
            self.send(encode_error(exc.request_id, exc))
            return
        if request.id is not None:
            self.uses_ids = True
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
        if self.inflight >= self._max_inflight:
            self._below_limit.clear()
            self._below_limit.wait()  # backpressure: this peer's requests wait in TCP
        self.inflight += 1
        self._idle.clear()
        if request.id is None:
            # Answered before the next line is read anyway: run it right here.
            self.worker.run_in_slot(self._run_task, request, function)
        else:
            self.worker.spawn_in_slot(self._run_task, request, function)

    def _run_task(self, request: Request, function: Callable[..., Any]) -> None:
        try:
            sink = self._progress_sink(request) if request.progress else None
            self.send(self.worker.run_task(request, function, sink))
        finally:
            self.inflight -= 1
            if not self.inflight:
                self._idle.set()
            if self.inflight < self._max_inflight:
                self._below_limit.set()

    def _authenticate(self, line: bytes) -> None:
        token = parse_hello(line)
        expected = self.worker.auth_token
        assert expected is not None
        if token is not None and hmac.compare_digest(token.encode(), expected):
            self.authenticated = True
            return
        self.worker.note_refused(self.peer, "no token, or the wrong one")
        self.send(encode_error(None, Unauthorized(
            'this server requires a token: send {"auth": TOKEN} as the first line '
            "(TaskClient(auth_token=...), or [gateway] auth_token_file); the connection is "
            "closed")))
        self.closing = True

    def _progress_sink(self, request: Request) -> Callable[[Any], None]:
        return lambda value: self.send(encode_progress(request.id, value))
