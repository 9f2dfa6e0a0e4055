"""The WebSocket after its handshake: frames parsed and built by wsproto, on greenlets.

Theory of operation
-------------------
gevent-websocket does the handshake (:mod:`greentask.gateway.handshake`);
after it, every frame on the socket goes through a wsproto
:class:`~wsproto.connection.Connection`, the sans-IO RFC 6455 machine of
python-hyper, with permessage-deflate (RFC 7692) when the browser offered
it. :class:`FramedSocket` only moves bytes and enforces the gateway's limits:

- the reader greenlet (:meth:`FramedSocket.receive`) feeds what the socket
  delivers to wsproto, answers pings, joins a message's fragments and stops
  one that grows past ``max_message`` (close 1009) as its bytes arrive, so a
  message is never held beyond the limit; a frame whose header announces
  more than the limit is refused from its header (:class:`FrameLimit`);
- whatever wsproto refuses (a control frame over 125 bytes, a close code
  that must not be sent, a close frame of one byte, text that cannot be
  UTF-8, as soon as its bytes show it) becomes the close code wsproto names;
- a frame written, from any greenlet (a task's reply, a pong, a close), never
  blocks its writer: it goes to the socket at once if the socket takes it
  whole, else to the socket's outbox, which a greenlet of its own drains in
  order. A task connection's reader can therefore hand replies to a browser
  that reads slowly without stalling everyone else's. While the outbox holds
  more than :data:`OUTBOX_HIGH_WATER` bytes, the reader stops reading the
  browser's messages (so no new tasks start) and droppable messages
  (progress) are dropped;
- a close the gateway starts (1001 when gunicorn stops the worker) is
  finished by the reader when the browser's own close frame comes; after
  :data:`CLOSE_WAIT` seconds without it the socket is shut;
- after a failure (1002, 1007, 1009) the gateway stops writing and reads
  and discards for up to :data:`CLOSE_WAIT` seconds before the socket is
  closed, since closing with unread input would reset the connection and
  could lose the close frame on its way.

:class:`BoundedDeflate` is wsproto's permessage-deflate with the gateway's
memory bounds: the server's window (and the client's, when it lets the
server choose) from ``[gateway] compression_window_bits``, and inflation
stopped at ``max_message`` bytes, so a small compressed frame cannot expand
into a large allocation.
"""

from __future__ import annotations

import collections
import socket
import zlib
from typing import Any

import gevent
import gevent.event
import gevent.ssl
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    TextMessage,
)
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import CloseReason, Opcode, RsvBits
from wsproto.utilities import LocalProtocolError

#: Close codes (RFC 6455 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_TOO_BIG = 1009
#: Bytes read from the socket at a time.
READ_SIZE = 64 * 1024
#: Seconds the reader waits for the browser's close frame after the gateway's.
CLOSE_WAIT = 2.0
#: Bytes waiting for a browser past which the gateway stops reading its
#: messages and drops its progress events.
OUTBOX_HIGH_WATER = 1 << 20


class FrameLimit(Extension):
    """Not an extension on the wire: wsproto's hook at each frame header, where a data
    frame that announces more than ``max_message`` bytes is refused (1009) before its
    payload is read."""

    name = "greentask-frame-limit"

    def __init__(self, max_message: int) -> None:
        # A compressed frame may be a little longer than what it inflates to.
        self.max_frame = max_message + max_message // 64 + 64

    def enabled(self) -> bool:
        """Always on (never negotiated)."""
        return True

    def offer(self) -> bool:
        """Never offered."""
        return False

    def frame_inbound_header(self, proto: Any, opcode: Opcode, rsv: RsvBits,
                             payload_length: int) -> CloseReason | RsvBits:
        """Refuse a data frame longer than the limit; claim no reserved bit."""
        if not opcode.iscontrol() and payload_length > self.max_frame:
            return CloseReason.MESSAGE_TOO_BIG
        return RsvBits(False, False, False)


class BoundedDeflate(PerMessageDeflate):
    """permessage-deflate whose memory the gateway's settings bound."""

    def __init__(self, window_bits: int, max_message: int) -> None:
        super().__init__(client_max_window_bits=window_bits, server_max_window_bits=window_bits)
        self.window_bits = window_bits
        self.max_message = max_message

    def accept(self, offer: str) -> bool | str | None:
        """The response's parameters; the server's window is never above the setting."""
        parameters = super().accept(offer)
        if self.server_max_window_bits > self.window_bits:
            self.server_max_window_bits = self.window_bits  # a smaller window is always valid
        return parameters

    def frame_outbound(self, proto: Any, opcode: Opcode, rsv: Any, data: bytes,
                       fin: bool) -> tuple[Any, bytes]:
        """Compress one outgoing frame; the compressor's hash table is sized to its window."""
        if self._compressor is None and opcode in (Opcode.TEXT, Opcode.BINARY):
            # zlib keeps 2^(bits + 2) bytes of window and 2^(level + 9) of hash
            # per socket; wsproto's default level (8) would be 128 KiB each.
            self._compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED,
                                                -self.server_max_window_bits,
                                                max(1, self.server_max_window_bits - 7))
        return super().frame_outbound(proto, opcode, rsv, data, fin)

    def frame_inbound_payload_data(self, proto: Any, data: bytes) -> bytes | CloseReason:
        """Inflate one chunk, never past ``max_message`` bytes (more is close 1009)."""
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        try:
            inflated = self._decompressor.decompress(bytes(data), self.max_message + 1)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        if self._decompressor.unconsumed_tail or len(inflated) > self.max_message:
            return CloseReason.MESSAGE_TOO_BIG
        return inflated


def deflate_for(offers: str, window_bits: int, max_message: int
                ) -> tuple[BoundedDeflate, str] | None:
    """The extension and its response header value, if ``offers`` (the request's
    ``Sec-WebSocket-Extensions``) asks for permessage-deflate with parameters we accept."""
    for offer in offers.split(","):
        if offer.split(";", 1)[0].strip() != PerMessageDeflate.name:
            continue
        extension = BoundedDeflate(window_bits, max_message)
        try:
            parameters = extension.accept(offer)
        except ValueError:  # a malformed window size: try the browser's next offer
            continue
        if parameters is None or parameters is False:
            continue
        header = PerMessageDeflate.name
        if isinstance(parameters, str) and parameters:
            header += "; " + parameters
        return extension, header
    return None


class FramedSocket:
    """One accepted WebSocket: ``receive()`` messages, ``send()`` them, ``close()``."""

    def __init__(self, environ: dict[str, Any], handler: Any, max_message: int,
                 extensions: list[Extension]) -> None:
        self.environ = environ
        #: gevent-websocket's handler (its ``server`` tells when gunicorn stops).
        self.handler = handler
        self.max_message = max_message
        self.closed = False
        self._socket = handler.socket
        self._rfile = handler.rfile
        self._connection = Connection(ConnectionType.SERVER,
                                      [FrameLimit(max_message), *extensions])
        # gevent's TLS socket waits even when told not to: its writes all go
        # through the outbox.
        self._write_now = not isinstance(self._socket, gevent.ssl.SSLSocket)
        #: Frames the socket has not taken yet, oldest first, and their size.
        self._outbox: collections.deque[bytes | memoryview] = collections.deque()
        self.outbox_size = 0
        self._drained = gevent.event.Event()
        self._drained.set()
        #: A write failed: the browser is gone, nothing more is written.
        self._broken = False
        #: The parts of the message being received, and their size.
        self._parts: list[Any] = []
        self._size = 0

    # -- reading (one greenlet) --------------------------------------------

    def receive(self) -> str | bytes | None:
        """The next message, or None once the socket is closed (with the right code)."""
        while True:
            for event in self._connection.events():
                if isinstance(event, Message):
                    if self.closed:
                        continue  # sent before the browser saw the gateway's close
                    message = self._add(event)
                    if message is not None:
                        return message
                    if self.closed:  # too big
                        return None
                elif isinstance(event, Ping):
                    self._write(event.response())
                elif isinstance(event, CloseConnection):
                    self._closed_by(event)
                    return None
                # A Pong needs nothing.
            if self._connection.state is ConnectionState.CLOSED:
                return None
            if self.outbox_size > OUTBOX_HIGH_WATER:
                self._drained.wait()  # the browser reads nothing: start nothing new
            try:
                data = self._rfile.read1(READ_SIZE)
            except OSError:
                data = b""
            if not data:  # end of stream, without a close frame (1006)
                self.closed = True
                return None
            self._connection.receive_data(data)

    def _add(self, event: Message) -> str | bytes | None:
        data = event.data
        size = len(data) if isinstance(data, bytes) or data.isascii() else \
            len(data.encode())
        self._size += size
        if self._size > self.max_message:
            self._parts, self._size = [], 0
            self._fail(CLOSE_TOO_BIG, f"message larger than {self.max_message} bytes")
            return None
        self._parts.append(data)
        if not event.message_finished:
            return None
        parts, self._parts, self._size = self._parts, [], 0
        joiner = "" if isinstance(event, TextMessage) else b""
        return parts[0] if len(parts) == 1 else joiner.join(parts)

    def _closed_by(self, event: CloseConnection) -> None:
        if self._connection.state is ConnectionState.REMOTE_CLOSING:
            self._write(event.response())  # the browser's close, echoed
        elif self._connection.state is ConnectionState.OPEN:
            # What wsproto refused: fail the connection with its code.
            self._fail(event.code, event.reason or "")
        self.closed = True

    def _fail(self, code: int, reason: str) -> None:
        """Close with ``code``, stop writing, and discard input for a moment (linger)."""
        self.close(code, reason)
        self._drained.wait(CLOSE_WAIT)  # the close frame first
        try:
            self._socket.shutdown(socket.SHUT_WR)
            with gevent.Timeout(CLOSE_WAIT, False):
                while self._rfile.read1(READ_SIZE):
                    pass
        except OSError:
            pass

    # -- writing (any greenlet) --------------------------------------------

    def send(self, message: str | bytes, droppable: bool = False) -> bool:
        """Send one message (text for ``str``) without waiting; raises ``OSError`` once
        the socket closed. A ``droppable`` one is dropped (False) while the browser
        is not reading (past :data:`OUTBOX_HIGH_WATER`)."""
        if droppable and self.outbox_size > OUTBOX_HIGH_WATER:
            return False
        event = TextMessage(data=message) if isinstance(message, str) else \
            BytesMessage(data=message)
        if not self._write(event):
            raise OSError("the WebSocket is closed")
        return True

    def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Send a close frame with ``code`` and ``reason``; the reader then finishes it,
        or the socket is shut after :data:`CLOSE_WAIT` seconds without the browser's."""
        if self.closed:
            return
        self._write(CloseConnection(code=code, reason=reason[:100]))
        self.closed = True
        gevent.spawn_later(CLOSE_WAIT, self._shut_if_open)

    def _shut_if_open(self) -> None:
        if self._connection.state is not ConnectionState.CLOSED:
            try:
                self._socket.shutdown(socket.SHUT_RDWR)  # the reader sees the end
            except OSError:
                pass

    def _write(self, event: Any) -> bool:
        # Never waits, so frames from different greenlets cannot interleave.
        if self._broken:
            return False
        try:
            data: bytes | memoryview = self._connection.send(event)
        except LocalProtocolError:  # closing or closed already
            return False
        if self._outbox or not self._write_now:
            return self._queue(data)
        try:
            sent = self._socket.send(data, 0, 0.0)  # gevent's: no wait
        except BlockingIOError:
            sent = 0
        except OSError:
            self._break()
            return False
        if sent < len(data):
            return self._queue(memoryview(data)[sent:])
        return True

    def _queue(self, data: bytes | memoryview) -> bool:
        self._outbox.append(data)
        self.outbox_size += len(data)
        if len(self._outbox) == 1:
            self._drained.clear()
            gevent.spawn_raw(self._drain)
        return True

    def _drain(self) -> None:
        try:
            while self._outbox:
                data = self._outbox[0]
                self._socket.sendall(data)
                self._outbox.popleft()
                self.outbox_size -= len(data)
        except OSError:
            self._break()
        finally:
            self._drained.set()

    def _break(self) -> None:
        self.closed = self._broken = True
        self._outbox.clear()
        self.outbox_size = 0
