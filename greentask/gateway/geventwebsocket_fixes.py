"""Fixes for gevent-websocket 0.10.1, applied when :mod:`greentask.gateway.app` is imported.

gevent-websocket's last release is from 2017. Rather than copy it, greentask
keeps a subclass of its ``WebSocket`` and wraps two handler methods; each fix
is listed in ``docs/gateway.md`` with the defect it closes:

- frames longer than ``max_message``, or messages whose fragments add up to
  more, close the socket with 1009 *before* the payload is read;
- a client frame that is not masked fails the connection (1002, RFC 6455 5.1);
- unmasking XORs the whole payload at once, and a text message is checked as
  UTF-8 by the C decoder (invalid: 1007), instead of byte-by-byte Python;
- ``close(code, reason)`` sends the code (0.10.1 sends only the reason);
- every frame written to one socket, data, pong or close, holds one lock, so
  frames from several greenlets never interleave;
- a handshake the gateway does not admit (origin, ``authorize``) is refused
  with its status before the upgrade, a malformed ``Sec-WebSocket-Key``
  gets 400 (not 500), and refusal bodies are bytes (0.10.1 crashes writing
  its own str bodies);
- under gunicorn, requests reach gunicorn's access log.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Callable
from typing import Any

from gevent.lock import RLock
from geventwebsocket import handler as ws_handler
from geventwebsocket.exceptions import FrameTooLargeException, ProtocolError
from geventwebsocket.websocket import Header, WebSocket

#: Close codes (RFC 6455 7.4.1).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask``, as one big-integer operation."""
    if not payload:
        return payload
    repeated = (mask * (len(payload) // 4 + 1))[:len(payload)]
    value = int.from_bytes(payload, "little") ^ int.from_bytes(repeated, "little")
    return value.to_bytes(len(payload), "little")


class GuardedWebSocket(WebSocket):
    """gevent-websocket's ``WebSocket`` with size limits, masking rules and a write lock."""

    #: Longest message accepted (set from ``[gateway] max_message``).
    max_message = 64 * 1024

    def __init__(self, environ: dict[str, Any], stream: Any, handler: Any) -> None:
        super().__init__(environ, stream, handler)
        self.write_lock = RLock()
        unlocked_write = self.raw_write

        def locked_write(data: bytes) -> None:
            with self.write_lock:
                unlocked_write(data)
        self.raw_write = locked_write

    def read_frame(self) -> tuple[Header, bytes]:
        """One frame; its length and mask are checked before the payload is read."""
        header = Header.decode_header(self.stream)
        if header.flags:
            raise ProtocolError("reserved bits set")
        if not header.mask:
            raise ProtocolError("client frames must be masked")
        if header.length > self.max_message:
            raise FrameTooLargeException(f"frame of {header.length} bytes")
        payload = self.raw_read(header.length) if header.length else b""
        if len(payload) != header.length:
            raise ProtocolError("unexpected end of stream in a frame")
        return header, unmask(payload, header.mask)

    def read_message(self) -> str | bytes | None:
        """One whole message (fragments joined), or None once a close frame came."""
        opcode = None
        parts: list[bytes] = []
        size = 0
        while True:
            header, payload = self.read_frame()
            if header.opcode == self.OPCODE_PING:
                self.send_frame(payload, self.OPCODE_PONG)
                continue
            if header.opcode == self.OPCODE_PONG:
                continue
            if header.opcode == self.OPCODE_CLOSE:
                self._answer_close(payload)
                return None
            if header.opcode in (self.OPCODE_TEXT, self.OPCODE_BINARY):
                if opcode is not None:
                    raise ProtocolError("a new message began inside a fragmented one")
                opcode = header.opcode
            elif header.opcode != self.OPCODE_CONTINUATION or opcode is None:
                raise ProtocolError(f"unexpected opcode {header.opcode}")
            size += len(payload)
            if size > self.max_message:
                raise FrameTooLargeException(f"message of more than {size} bytes")
            parts.append(payload)
            if header.fin:
                break
        message = b"".join(parts)
        return message.decode("utf-8") if opcode == self.OPCODE_TEXT else message

    def _answer_close(self, payload: bytes) -> None:
        code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else CLOSE_NORMAL
        self.close(code if 1000 <= code < 5000 else CLOSE_PROTOCOL_ERROR)

    def receive(self) -> str | bytes | None:
        """The next message, or None when the socket closed (with the right close code)."""
        if self.closed:
            return None
        try:
            return self.read_message()
        except FrameTooLargeException:
            self.close(CLOSE_TOO_BIG, f"message larger than {self.max_message} bytes")
        except UnicodeDecodeError:
            self.close(CLOSE_INVALID_DATA, "text message is not valid UTF-8")
        except ProtocolError as exc:
            self.close(CLOSE_PROTOCOL_ERROR, str(exc)[:100])
        except OSError:
            self.closed = True
        return None

    def close(self, code: int = CLOSE_NORMAL, message: bytes | str = b"") -> None:
        """Send a close frame carrying ``code`` and ``message``, then stop using the socket."""
        if self.closed:
            return
        reason = message.encode() if isinstance(message, str) else message
        try:
            self.send_frame(struct.pack("!H", code) + reason[:120], self.OPCODE_CLOSE)
        except Exception:  # the peer is gone: nothing left to tell it
            pass
        finally:
            self.closed = True
            self.stream = self.raw_write = self.raw_read = None
            self.environ = None


#: The gateway's handshake check: None to admit, or (status line, body) to refuse.
Admit = Callable[[dict[str, Any]], "tuple[str, bytes] | None"]
_admit: Admit | None = None


def _upgrade_connection(self: Any) -> Any:
    environ = self.environ
    refusal = _admit(environ) if _admit is not None else None
    if refusal is not None:
        status, body = refusal
        self.start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                     ("Content-Length", str(len(body)))])
        return [body]
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid_key = False
    if not valid_key:
        self.start_response("400 Bad Request", [("Content-Type", "text/plain")])
        return [b"Sec-WebSocket-Key must be 16 bytes, base64-encoded"]
    result = _original_upgrade_connection(self)
    if result:  # gevent-websocket's own refusals are str, which cannot be written
        return [part.encode() if isinstance(part, str) else part for part in result]
    return result


_original_upgrade_connection = ws_handler.WebSocketHandler.upgrade_connection
_original_log_request = ws_handler.WebSocketHandler.log_request


def _log_request(self: Any) -> None:
    # gevent-websocket logs to a logger of its own, so under gunicorn nothing
    # reached the access log: use gunicorn's handler when gunicorn runs us.
    if hasattr(getattr(self.server, "log", None), "access") and self.environ is not None:
        from gunicorn.workers.ggevent import PyWSGIHandler
        # gunicorn's own handler adds this key, which its access log reads.
        self.environ.setdefault("RAW_URI", self.path)
        PyWSGIHandler.log_request(self)
    else:
        _original_log_request(self)


def install(max_message: int, admit: Admit) -> None:
    """Apply the fixes to gevent-websocket (idempotent)."""
    global _admit
    GuardedWebSocket.max_message = max_message
    _admit = admit
    ws_handler.WebSocket = GuardedWebSocket  # the handler builds sockets by this name
    ws_handler.WebSocketHandler.upgrade_connection = _upgrade_connection
    ws_handler.WebSocketHandler.log_request = _log_request
