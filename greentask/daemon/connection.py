"""One client connection of a worker: read request lines, admit them, send the replies.

Theory of operation
-------------------
A :class:`Connection` is served by one reader greenlet (the worker's
``StreamServer`` handler). It feeds received bytes to the protocol's
:class:`~greentask.protocol.LineDecoder`, answers bad lines at once and hands
each valid request to the process's :class:`~greentask.daemon.runner.TaskRunner`,
as the request's :class:`~greentask.daemon.runner.TaskOwner`: the runner sends
the replies back through :meth:`Connection.send` and calls
:meth:`Connection.task_finished`. Past ``max_inflight_per_connection`` the
reader waits (backpressure).

Replies go through the connection's :class:`~greentask.daemon.writer.ReplyWriter`;
a peer that does not read them blocks only its own writer, and past
:data:`greentask.daemon.writer.OUTBOX_HIGH_WATER` its reader stops reading. Sockets
have no timeouts: the worker's heartbeat calls :meth:`Connection.check_idle`.

A connection is in one :class:`Phase` at a time, changed only by
:meth:`Connection._enter`, which checks the move against :data:`PHASE_MOVES`
(:func:`greentask.daemon.lifecycle.check_move`).
"""

from __future__ import annotations

import enum
import hmac
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any, Protocol

import gevent
import gevent.socket
from gevent.event import Event

from greentask.daemon.lifecycle import check_move
from greentask.daemon.runner import TaskRunner
from greentask.daemon.writer import ReplyWriter
from greentask.errors import BadRequest, RemoteError, ShuttingDown, TaskTimeout, Unauthorized
from greentask.protocol import (
    LineDecoder,
    encode_closing,
    encode_error,
    parse_hello,
    parse_request,
)

log = logging.getLogger("greentask.worker")

#: Bytes read per ``recv``; also the most one read adds to a connection's buffer.
RECV_SIZE = 64 * 1024
#: How long a connection closed on an error keeps discarding input (seconds).
LINGER_SECONDS = 2.0
#: After telling an idle pipelining peer to close, how long to wait for it (seconds).
IDLE_GRACE = 10.0


class Phase(enum.Enum):
    """Where a connection is in its life."""

    #: The server requires a token, and the peer has not sent it yet.
    HELLO = "hello"
    #: Reading and running requests.
    OPEN = "open"
    #: Told the pipelining peer ``{"closing": true}``; still answering what it sends.
    ASKED_TO_CLOSE = "asked to close"
    #: Reading no more: the replies go out, then the connection closes.
    CLOSING = "closing"


#: The phases each phase may move to.
PHASE_MOVES: dict[Phase, frozenset[Phase]] = {
    Phase.HELLO: frozenset({Phase.OPEN, Phase.CLOSING}),
    Phase.OPEN: frozenset({Phase.ASKED_TO_CLOSE, Phase.CLOSING}),
    Phase.ASKED_TO_CLOSE: frozenset({Phase.CLOSING}),
    Phase.CLOSING: frozenset(),
}


@dataclass(frozen=True)
class ConnectionLimits:
    """What every connection of a process enforces (from ``[worker]``)."""

    max_line: int
    max_depth: int
    max_inflight: int
    #: The shared token a peer must send first, or None.
    auth_token: bytes | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> ConnectionLimits:
        """The limits of a ``config.worker`` section."""
        token = settings.auth_token_file
        return cls(settings.max_line, settings.max_json_depth,
                   settings.max_inflight_per_connection, token.encode() if token else None)


class Admission(Protocol):
    """What a connection asks of the process serving it."""

    @property
    def draining(self) -> bool:
        """True once the process stops taking new tasks."""

    def note_refused(self, peer: str, reason: str) -> None:
        """Count (and log, now and then) a peer refused for ``reason``."""


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
    """One peer: read request lines, hand them to the runner, send the replies."""

    def __init__(self, sock: socket.socket, peer: str, limits: ConnectionLimits,
                 runner: TaskRunner, admission: Admission) -> None:
        self.sock = sock
        self.peer = peer
        self.limits = limits
        self._max_depth = limits.max_depth
        self._max_inflight = limits.max_inflight
        self.admission = admission
        self.phase = Phase.OPEN if limits.auth_token is None else Phase.HELLO
        #: When the phase last changed.
        self.phase_since = time.monotonic()
        #: True once the peer sent a request with an id: it pipelines, and is
        #: told before the connection closes.
        self.uses_ids = False
        #: Since when the decoder holds part of a line (None: no partial line).
        self._partial_since: float | None = None
        self.last_active = time.monotonic()
        self.decoder = LineDecoder(limits.max_line)
        self.writer = ReplyWriter(sock)
        self.send = self.writer.send
        #: Tasks of this connection that have not finished.
        self.inflight = 0
        self._below_limit = Event()
        self._below_limit.set()
        self._idle = Event()
        self._idle.set()
        # Bound once: the per-request path below is the hot one.
        self._lookup = runner.registry.lookup
        self._submit = runner.submit

    def _enter(self, phase: Phase, now: float | None = None) -> None:
        """Move to ``phase`` (at ``now``); the one place a connection's phase changes."""
        if phase is self.phase:
            return
        check_move(PHASE_MOVES, self.phase, phase, f"the connection from {self.peer}")
        self.phase = phase
        self.phase_since = time.monotonic() if now is None else now

    def serve(self) -> None:
        """Run until the peer closes (or half-closes) and every reply is sent."""
        try:
            self._read_loop()
        finally:
            # A peer that half-closed after sending still gets its replies.
            self._idle.wait()
            self.writer.wait_flushed()
            if self.writer.dropped:
                log.info("%d repl%s to %s dropped: the peer closed before reading them",
                         self.writer.dropped, "y" if self.writer.dropped == 1 else "ies",
                         self.peer)
            if self.decoder.too_large:
                linger(self.sock)

    def stop_reading(self, how: int = socket.SHUT_RD) -> None:
        """Make the reader see end of input (a drain, an idle peer)."""
        shutdown_socket(self.sock, how)

    def ask_to_close(self, now: float | None = None) -> None:
        """Tell a pipelining peer to close once its replies are in (a drain, idleness)."""
        if self.phase is Phase.OPEN:
            self._enter(Phase.ASKED_TO_CLOSE, now)
            self.send(encode_closing())

    def task_finished(self) -> None:
        """The runner finished one of this connection's tasks (its reply is queued)."""
        self.inflight -= 1
        if not self.inflight:
            self._idle.set()
        if self.inflight < self._max_inflight:
            self._below_limit.set()

    def _read_loop(self) -> None:
        writer = self.writer
        writable = writer.writable
        while self.phase is not Phase.CLOSING and not writer.broken:
            writable.wait()
            try:
                data = self.sock.recv(RECV_SIZE)
            except OSError:
                return
            if not data:
                return
            self.last_active = time.monotonic()
            for line in self.decoder.feed(data):
                if self.phase is Phase.CLOSING:
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
        if self.phase is Phase.CLOSING:
            return
        if self._partial_since is not None and now - self._partial_since > limit:
            self._close_with(f"a request line stayed incomplete for more than {limit:g} s "
                             "([worker] idle_timeout); the connection is closed")
        elif self.writer.busy and now - self.writer.last_progress > limit:
            self._enter(Phase.CLOSING)
            self.stop_reading(socket.SHUT_RDWR)  # the writer fails; replies are dropped
        elif self.inflight or self.writer.busy or now - self.last_active <= limit:
            return
        elif not self.uses_ids:
            self._close_with(f"no complete request for {limit:g} s ([worker] idle_timeout); "
                             "the connection is closed")
        elif self.phase is not Phase.ASKED_TO_CLOSE:
            # A pipelining client keeps connections for reuse: ask it to close,
            # so no request of its is in flight when the connection goes.
            self.ask_to_close(now)
        elif now - self.phase_since > IDLE_GRACE:
            self._close_with(None)

    def _close_with(self, message: str | None) -> None:
        if message is not None:
            self.send(encode_error(None, TaskTimeout(message)))
        self._enter(Phase.CLOSING)
        self.stop_reading()  # the reader sees the end; replies go out, then it closes

    def _handle_line(self, line: bytes) -> None:
        if self.phase is Phase.HELLO:
            self._authenticate(line)
            return
        try:
            request = parse_request(line, self._max_depth)
        except BadRequest as exc:
            self.send(encode_error(exc.request_id, exc))
            return
        if request.id is not None:
            self.uses_ids = True
        if self.admission.draining:
            self.send(encode_error(request.id, ShuttingDown(
                "this worker process is shutting down; the task was not run, send it again "
                "(on a new connection)")))
            return
        try:
            function = self._lookup(request.function)
        except RemoteError as exc:
            self.send(encode_error(request.id, exc))
            return
        if self.inflight >= self._max_inflight:
            self._below_limit.clear()
            self._below_limit.wait()  # backpressure: this peer's requests wait in TCP
        self.inflight += 1
        self._idle.clear()
        self._submit(request, function, self)

    def _authenticate(self, line: bytes) -> None:
        token = parse_hello(line)
        expected = self.limits.auth_token
        assert expected is not None
        if token is not None and hmac.compare_digest(token.encode(), expected):
            self._enter(Phase.OPEN)
            return
        self.admission.note_refused(self.peer, "no token, or the wrong one")
        self.send(encode_error(None, Unauthorized(
            'this server requires a token: send {"auth": TOKEN} as the first line '
            "(TaskClient(auth_token=...), or [gateway] auth_token_file); the connection is "
            "closed")))
        self._enter(Phase.CLOSING)
