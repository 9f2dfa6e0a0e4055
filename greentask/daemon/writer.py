"""The outbound half of a connection: reply lines batched per event-loop turn.

Task greenlets must never block on a slow peer (they hold a task permit), so
they only queue bytes here. Everything queued during one turn of the event
loop is written at the end of that turn by a loop callback, with one
non-blocking ``write``: no greenlet switch, one system call for many replies.
A reader with nothing else ready in its loop turn flushes at once
(:meth:`ReplyWriter.flush`), so a lone peer's reply does not wait for the
turn to end. Only when the socket does not take it all does a writer greenlet start,
which waits for the peer to read. A TLS socket always uses the writer
greenlet: its bytes must be encrypted, so a plain ``write`` cannot send them.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import time
from typing import Any

import gevent
import gevent.socket
from gevent.event import Event

from greentask.protocol import DEFAULT_MAX_QUEUED

log = logging.getLogger("greentask.worker")



def shutdown_socket(sock: socket.socket, how: int) -> None:
    """Shut down one direction of ``sock``, keeping its TLS layer (if any) in place."""
    # SSLSocket.shutdown drops the TLS object, so replies still queued would
    # go out in clear text: call the plain socket's method.
    try:
        gevent.socket.socket.shutdown(sock, how)
    except OSError:
        pass


class ReplyWriter:
    """Queue reply lines for one socket and send them in batches.

    Past a quarter of ``max_queued`` unsent bytes :attr:`writable` is cleared
    (its connection stops reading requests); past ``max_queued`` itself the
    peer, which reads none of them, is cut off: the socket is shut down and
    every queued reply dropped, so one peer's memory stays bounded.
    """

    def __init__(self, sock: socket.socket, max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        self.sock = sock
        self.broken = False
        #: Why the peer was cut off for not reading (see the class), or None.
        self.cut_off_reason: str | None = None
        self.max_queued = max_queued
        self._high_water = max_queued // 4
        #: Unsent bytes; the reader stops reading above a quarter of max_queued.
        self.size = 0
        #: Set while the peer can take more replies (size under the high water);
        #: ``stalled`` is True while it is not (a plain attribute: cheaper to test).
        self.writable = Event()
        self.writable.set()
        self.stalled = False
        #: When the peer last took reply bytes (or the queue last became non-empty).
        self.last_progress = time.monotonic()
        self._fd = None if isinstance(sock, ssl.SSLSocket) else sock.fileno()
        #: Reply lines lost because the peer was gone.
        self.dropped = 0
        self._outbox: list[bytes] = []
        #: What the write loop is sending now (taken out of the outbox).
        self._sending = b""
        #: The loop callback that sends this turn's replies, while one is due.
        self._flush_callback: Any = None
        self._writer: gevent.Greenlet | None = None
        self._loop = gevent.get_hub().loop
        #: Made only when someone waits for the replies to be sent (most never do).
        self._flushed: Event | None = None

    def send(self, data: bytes) -> None:
        """Queue ``data``; dropped (and counted) once the peer is gone."""
        if self.broken:
            self.dropped += data.count(b"\n")
            return
        if not self.size:
            self.last_progress = time.monotonic()
        self._outbox.append(data)
        self.size += len(data)
        if self.size > self._high_water:
            if self.size > self.max_queued:
                self.cut_off(f"more than {self.max_queued} bytes of replies were queued "
                             "([worker] max_queued_replies)")
                return
            self.stalled = True
            self.writable.clear()
        if self._flush_callback is None and self._writer is None:
            self._flush_callback = self._loop.run_callback(self._flush_without_blocking)

    def flush(self) -> None:
        """Send what is queued now, as far as the socket takes it without waiting."""
        if self._flush_callback is not None:
            self._flush_callback.stop()  # it would find nothing left to send
            self._flush_without_blocking()

    def cut_off(self, reason: str) -> None:
        """Give up on a peer that reads nothing: shut the socket down, drop every reply."""
        if self.broken:
            return
        self.cut_off_reason = reason
        shutdown_socket(self.sock, socket.SHUT_RDWR)  # a blocked send fails at once
        self._fail(b"", OSError(reason))

    @property
    def busy(self) -> bool:
        """True while replies wait to be sent or are being sent."""
        return bool(self.size) or self._writer is not None

    def log_losses(self, peer: str) -> None:
        """Log what ``peer`` lost (its connection is ending): cut off, or replies dropped."""
        if self.cut_off_reason:
            log.warning("connection from %s cut off, its peer does not read: %s; %d replies "
                        "dropped", peer, self.cut_off_reason, self.dropped)
        elif self.dropped:
            log.info("%d repl%s to %s dropped: the peer closed before reading them",
                     self.dropped, "y" if self.dropped == 1 else "ies", peer)

    def wait_flushed(self) -> None:
        """Block until everything queued is sent (or the peer is gone)."""
        while not self.broken and (self._outbox or self._sending):
            if self._flushed is None:
                self._flushed = Event()
            else:
                self._flushed.clear()
            self._flushed.wait()

    def _take(self) -> bytes:
        outbox = self._outbox
        data = b"".join(outbox) if len(outbox) > 1 else outbox[0]
        self._outbox = []
        self.size = 0
        return data

    def _flush_without_blocking(self) -> None:
        # Runs in the hub (or in a reader, by flush): it must not block or raise.
        self._flush_callback = None
        if not self._outbox or self._writer is not None:
            return
        if self._fd is None:
            self._writer = gevent.spawn(self._write_loop)
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
        if self.stalled or self._flushed is not None:
            self._sent()
        # Otherwise _sent has nothing to do: last_progress matters only while
        # replies wait, and a send sets it when it queues into an empty outbox.

    def _write_loop(self) -> None:
        while self._outbox:
            self._sending = self._take()
            failed = False  # a flag, not a break in the try: mypyc compiles no such break
            try:
                self.sock.sendall(self._sending)
            except OSError as exc:
                failed = True
                self._fail(b"", exc)
            finally:
                self._sending = b""
            if failed:
                break
            self._sent()
        self._writer = None

    def _sent(self) -> None:
        self.last_progress = time.monotonic()
        if self.stalled and self.size <= self._high_water:
            self.stalled = False
            self.writable.set()
        if not self._outbox and self._flushed is not None:
            self._flushed.set()

    def _fail(self, unsent: bytes, exc: OSError) -> None:
        if self.broken:
            return  # cut off, then the blocked send failed: counted once
        self.broken = True
        # The replies in the chunk being sent count too: the peer took none of
        # a cut-off chunk, or the chunk was lost with the connection.
        self.dropped += sum(chunk.count(b"\n") for chunk in (unsent, self._sending,
                                                             *self._outbox))
        self._outbox = []
        self.size = 0
        self.stalled = False
        self.writable.set()
        if self._flushed is not None:
            self._flushed.set()
        log.debug("peer went away, replies dropped: %s", exc)


#: How long a connection closed on purpose keeps discarding input (seconds).
LINGER_SECONDS = 2.0


def linger(sock: socket.socket) -> None:
    """Send FIN, then discard what the peer still sends for up to :data:`LINGER_SECONDS`.

    Closing with unread input sends a reset, which can destroy what was sent
    just before (a TooLarge reply, a TLS alert) before the peer reads it.
    """
    shutdown_socket(sock, socket.SHUT_WR)
    try:
        with gevent.Timeout(LINGER_SECONDS, False):
            while sock.recv(65536):
                pass
    except OSError:
        pass
