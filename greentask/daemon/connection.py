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
a peer that does not read them blocks only its own writer: past a quarter of
``[worker] max_queued_replies`` its reader stops reading, past all of it the
peer is cut off. Sockets have no timeouts: the worker's heartbeat calls
:meth:`Connection.check_idle`, a drain :meth:`Connection.begin_drain` and
:meth:`Connection.check_asked`, a full process :meth:`Connection.evict`.

The rule that makes a close safe for every peer: a connection is closed
(by the server, on purpose) only once every request line it has read is
answered. Lines still in the same read get an error (``ShuttingDown``, or
``Unauthorized`` after a bad token); lines the reader never read are never
run, and the peer sees end of stream before their reply:
:func:`~greentask.daemon.writer.linger` sends FIN and discards them, so no
reset destroys the replies just sent.
The reader is never stopped with ``shutdown(SHUT_RD)`` (a later close with
unread input would reset): when it waits for input or for its writer, it is
woken with :class:`StopReading` instead.

A request with an id runs in the reader's own greenlet, so a task that
never waits is answered before the next read, with no greenlet switch.
When such a task waits, the runner calls :meth:`Connection._hand_over_reading`
from the event loop: another greenlet becomes the reader and goes on with
the lines already read. The greenlet that began serving stays the one
that ends it: once its task is done, it waits for the last reader.

A connection's phases and their moves are :mod:`greentask.daemon.phase`'s.
"""

from __future__ import annotations

import collections
import logging
import socket
import ssl
import time

import gevent
import greenlet
from gevent.event import Event
from gevent.socket import wait as wait_for

from greentask.daemon.admission import Admission, ConnectionLimits
from greentask.daemon.lifecycle import check_move
from greentask.daemon.phase import ASKED_TO_CLOSE, CLOSING, OPEN, PHASE_MOVES, Phase
from greentask.daemon.runner import TaskRunner
from greentask.daemon.waiters import Waiters
from greentask.daemon.writer import ReplyWriter, linger
from greentask.errors import BadRequest, RemoteError, ShuttingDown, TaskTimeout, Unauthorized
from greentask.protocol import (
    Cancel,
    LineDecoder,
    encode_closing,
    encode_error,
    parse_request,
)

log = logging.getLogger("greentask.worker")

#: Bytes read per ``recv``; also the most one read adds to a connection's buffer.
RECV_SIZE = 64 * 1024
#: After telling an idle pipelining peer to close, how long to wait for it (seconds).
IDLE_GRACE = 10.0


class StopReading(Exception):
    """Thrown into a reader waiting for input or for its writer: the connection closes."""


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
        #: True once the peer sent any request line.
        self.sent_requests = False
        #: What a line read after the connection began closing is answered with.
        self._refusal: RemoteError = ShuttingDown(
            "this connection is closing; the request was not run, send it again on a new "
            "connection")
        #: Since when the decoder holds part of a line (None: no partial line).
        self._partial_since: float | None = None
        self.last_active = time.monotonic()
        self.decoder = LineDecoder(limits.max_line)
        self.writer = ReplyWriter(sock, limits.max_queued)
        self.send = self.writer.send
        #: Fires on input: the gevent socket's own watcher (one of our own costs a
        #: connection 2.7 µs, and gevent's close wakes a reader parked on its own).
        #: None for TLS, which may hold input its fd does not show.
        self._readable = None if isinstance(sock, ssl.SSLSocket) else \
            getattr(sock, "_read_event", None)
        #: Tasks of this connection that have not finished.
        self.inflight = 0
        #: Who waits for one of them to finish: the reader at the in-flight
        #: limit, and the end of serve for the last.
        self._task_done = Waiters()
        #: The reader greenlet, and whether it is waiting for input or its writer
        #: (the only places it may be woken with StopReading).
        self._reader: greenlet.greenlet | None = None
        self._parked = False
        #: Lines read and not yet handled: a reader that took over goes on with them.
        self._lines: collections.deque[bytes] = collections.deque()
        #: Set once the last reader stopped reading (whichever greenlet it was).
        self._reading_ended = Event()
        #: True once the peer ended its side (end of stream or a reset).
        self._peer_done = False
        #: True once closed to make room for a new client.
        self.evicted = False
        #: How long a peer asked to close may keep the connection, once idle.
        self._ask_grace = IDLE_GRACE
        # Bound once: the per-request path below is the hot one.
        self.runner = runner
        self._get_task = runner.registry.get
        self._submit = runner.submit
        self._spawn = runner.spawn
        self._counting_loop = runner.counting_loop

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
            self._read()
            self._reading_ended.wait()  # reading was handed over: the last reader ends it
        finally:
            self._task_done.wait_until(lambda: not self.inflight)
            self.writer.wait_flushed()
            self.writer.log_losses(self.peer)
            if not self._peer_done and not self.writer.broken:
                # Closed on purpose, the peer perhaps still sending: FIN after
                # the replies, and its unread lines discarded, never reset.
                linger(self.sock)

    def _read(self) -> None:
        """Be the reader until reading ends or is handed over to another greenlet."""
        current = self._reader = greenlet.getcurrent()
        handed_over = False
        try:
            handed_over = self._read_loop(current)
        except StopReading:
            pass
        finally:
            if not handed_over:
                self._parked = False
                if self._peer_done:
                    # Here, not in serve(): the greenlet that began serving
                    # may be inside one of these tasks. The others finish (a
                    # peer that half-closed after sending gets its replies).
                    self.runner.cancel_on_disconnect(self)
                self._reading_ended.set()

    def _hand_over_reading(self) -> None:
        # Called from the hub when a task running in the reader waits: a
        # greenlet the hub starts (as shallow as any) reads meanwhile.
        if not self._reading_ended.is_set():
            self._reader = None
            self._spawn(self._read)

    def _close(self, now: float | None = None) -> None:
        """Read no more; the replies go out, then the connection closes (with a linger)."""
        if self.phase is Phase.CLOSING:
            return
        self._enter(Phase.CLOSING, now)
        if self._parked:
            gevent.get_hub().loop.run_callback(self._wake_reader)

    def _wake_reader(self) -> None:
        # Runs in the hub. Parked means suspended inside its wait for input or
        # its writer, so the throw lands there, never inside a task.
        if self._parked and self._reader is not None:
            self._reader.throw(StopReading())

    def ask_to_close(self, now: float | None = None, grace: float = IDLE_GRACE) -> None:
        """Tell a pipelining peer to close once its replies are in (a drain, idleness).

        Once it has nothing in flight, it is closed ``grace`` seconds after the notice.
        """
        if self.phase is Phase.OPEN:
            self._enter(Phase.ASKED_TO_CLOSE, now)
            self._ask_grace = grace
            self.send(encode_closing())

    @property
    def evictable(self) -> bool:
        """True when closing it to make room loses nothing: no task, no reply pending."""
        return (self.phase is Phase.OPEN or self.phase is Phase.HELLO) and \
            not self.inflight and not self.writer.busy

    def evict(self, grace: float) -> None:
        """Make room for a new client: close this idle connection, telling the peer how."""
        self.evicted = True
        if self.phase is Phase.HELLO:
            self._refuse_token("no token sent yet, and this worker needs room for other "
                               "clients; the connection is closed")
        elif self.uses_ids or not self.sent_requests:
            self.ask_to_close(grace=grace)
        else:
            self._close_with("this worker is serving [worker] max_connections connections and "
                             "needs room for a new client: this idle connection is closed")

    def begin_drain(self, now: float, grace: float) -> None:
        """The process stops: tell the peer, or close once its one request is answered.

        A peer that used ids, or has sent nothing yet (it may be about to
        pipeline), is told ``closing``; an id-less peer is closed after its
        request in progress; one that has not sent its token is closed.
        """
        if self.phase is not Phase.HELLO and (self.uses_ids or not self.sent_requests):
            self.ask_to_close(now, grace)
        else:
            self._close(now)

    def check_asked(self, now: float) -> None:
        """Close a peer told ``closing`` long enough ago that has nothing left in flight."""
        if self.phase is Phase.ASKED_TO_CLOSE and not self.inflight and \
                not self.writer.busy and now - self.phase_since >= self._ask_grace:
            self._close(now)

    def close_now(self) -> None:
        """The drain ran out of time: close whatever this peer is doing."""
        self._close()

    def task_finished(self) -> None:
        """The runner finished one of this connection's tasks (its reply is queued)."""
        self.inflight -= 1
        if self._task_done.anyone:
            self._task_done.wake()

    def _read_loop(self, current: greenlet.greenlet) -> bool:
        """Read and handle lines; True when another greenlet took over reading."""
        writer = self.writer
        writable = writer.writable
        recv = self.sock.recv
        lines = self._lines
        counting_loop = self._counting_loop
        readable = self._readable
        while True:
            while lines:
                self._handle_line(lines.popleft())
                if self._reader is not current:
                    return True
            if self.decoder.too_large:
                self.send(encode_error(None, self.decoder.too_large_error()))
                self._enter(Phase.CLOSING)
            if self.phase is CLOSING or writer.broken:
                return False
            if counting_loop is not None and not counting_loop.pendingcnt:
                # Nothing else is ready in this loop turn: the replies go out before
                # the next read, as a bare server's would (the peer's next request may
                # then be there). Otherwise (or if the loop cannot tell) they join the
                # turn's batch: writing while other peers wait costs more.
                writer.flush()
            self._parked = True
            try:
                if writer.stalled:
                    writable.wait()
                elif writer.size and readable is not None:
                    # Its replies wait for the turn's end, so a peer waiting for them has sent
                    # nothing: a recv now would fail (EAGAIN, an OSError made and caught).
                    wait_for(readable)
                data = recv(RECV_SIZE)
            except OSError:
                self._peer_done = True
                return False
            finally:
                self._parked = False
            if not data:
                self._peer_done = True
                return False
            self.last_active = time.monotonic()
            lines.extend(self.decoder.feed(data))
            if not self.decoder.buffered:
                self._partial_since = None
            elif self._partial_since is None:
                self._partial_since = self.last_active

    def check_idle(self, now: float, limit: float) -> None:
        """Close a peer that stalls (every heartbeat; sockets themselves have no timeout).

        A peer that reads none of its replies for ``limit`` is cut off,
        whatever the connection is doing. Half a line kept past ``limit``
        (slowloris) or silence past ``limit`` with nothing running closes
        the connection; a pipelining peer is asked to close first.
        """
        writer = self.writer
        if writer.busy and now - writer.last_progress > limit:
            writer.cut_off(f"it took none of its replies for {limit:g} s ([worker] "
                           "idle_timeout)")
            self._close(now)
            return
        phase = self.phase
        if phase is Phase.CLOSING:
            return
        if phase is Phase.ASKED_TO_CLOSE:
            self.check_asked(now)
        elif phase is Phase.HELLO and now - self.phase_since > self.limits.hello_timeout:
            self.admission.note_refused(self.peer, "no token in time")
            self._refuse_token(f"no token within {self.limits.hello_timeout:g} s ([worker] "
                               'hello_timeout): send {"auth": TOKEN} as the first line; the '
                               "connection is closed", now)
        elif self._partial_since is not None and now - self._partial_since > limit:
            if self.uses_ids:
                self.ask_to_close(now)  # a pipelining peer is told, as when idle
            else:
                self._close_with(f"a request line stayed incomplete for more than {limit:g} s "
                                 "([worker] idle_timeout); the connection is closed")
        elif self.inflight or writer.busy or now - self.last_active <= limit:
            return
        elif not self.uses_ids:
            self._close_with(f"no complete request for {limit:g} s ([worker] idle_timeout); "
                             "the connection is closed")
        else:
            # A pipelining client keeps connections for reuse: ask it to close,
            # so no request of its is in flight when the connection goes.
            self.ask_to_close(now)

    def _close_with(self, message: str) -> None:
        self.send(encode_error(None, TaskTimeout(message)))
        self._close()

    def _handle_line(self, line: bytes) -> None:
        phase = self.phase
        if phase is not OPEN and phase is not ASKED_TO_CLOSE:
            if phase is Phase.HELLO:
                self._authenticate(line)
            else:
                self._refuse(line)
            return
        self.sent_requests = True
        try:
            request = parse_request(line, self._max_depth)
        except BadRequest as exc:
            self.send(encode_error(exc.request_id, exc))
            return
        if isinstance(request, Cancel):
            self.runner.cancel(self, request.id)  # no reply: the task's own one says it
            return
        if request.id is not None:
            self.uses_ids = True
        refusal = self.admission.refusal
        if refusal is not None:
            self.send(encode_error(request.id, refusal))
            return
        function = self._get_task(request.function)
        if function is None:
            self.send(encode_error(request.id, self.runner.registry.unknown(request.function)))
            return
        if self.inflight >= self._max_inflight:
            # Backpressure: this peer's requests wait in TCP.
            self._task_done.wait_until(self._below_limit)  # a method: no closure here
        self.inflight += 1
        self._submit(request, function, self, self._hand_over_reading)

    def _below_limit(self) -> bool:
        return self.inflight < self._max_inflight

    def _refuse(self, line: bytes) -> None:
        """Answer a line read after the connection began closing: it is not run."""
        try:
            request = parse_request(line, self._max_depth)
        except BadRequest as exc:
            self.send(encode_error(exc.request_id, self._refusal))
            return
        if isinstance(request, Cancel):
            self.runner.cancel(self, request.id)  # still running here: it may stop
            return
        self.send(encode_error(request.id, self._refusal))

    def _authenticate(self, line: bytes) -> None:
        if self.limits.token_matches(line):
            self._enter(Phase.OPEN)
            return
        self.admission.note_refused(self.peer, "no token, or the wrong one")
        self._refuse_token('this server requires a token: send {"auth": TOKEN} as the first '
                           "line (TaskClient(auth_token=...), or [gateway] auth_token_file); "
                           "the connection is closed")

    def _refuse_token(self, message: str, now: float | None = None) -> None:
        """Answer Unauthorized, and the same to every line read after it; then close."""
        self._refusal = Unauthorized(message)
        self.send(encode_error(None, self._refusal))
        self._close(now)
