"""The WebSocket handshake on gevent-websocket's handler, then wsproto's frames.

gevent-websocket 0.10.1 (2017) stays for what the design card names it for:
the gunicorn worker class and its handler. :func:`install` replaces the
handler's ``upgrade_websocket``, the one place a request becomes a
WebSocket, with :func:`upgrade_websocket`:

- a request that is not an upgrade goes to the WSGI app, as before;
- an upgrade over HTTP/1.0 is 400, one without ``Sec-WebSocket-Version:
  13`` is 426 with that header, a malformed ``Sec-WebSocket-Key`` is 400,
  and a handshake the gateway does not admit (origin, ``authorize``) gets
  that check's 403 or 401; every refusal has a body saying why (0.10.1 sent
  "402 Bad Request", and crashed writing its str bodies);
- permessage-deflate is accepted when the browser offers it and ``[gateway]
  compression`` is on;
- the socket the app receives is a :class:`~greentask.gateway.frames.FramedSocket`.

It also sends the handler's requests to gunicorn's access log (0.10.1 logs
to a logger of its own, so nothing reached it).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from geventwebsocket import handler as ws_handler

from greentask.gateway.frames import FramedSocket, deflate_for

#: RFC 6455 1.3: appended to the key before hashing.
ACCEPT_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: The only version RFC 6455 defines.
VERSION = "13"

#: The gateway's handshake check: None to admit, or (status line, body) to refuse.
Admit = Callable[[dict[str, Any]], "tuple[str, bytes] | None"]


@dataclass
class Policy:
    """What the handshake needs from ``[gateway]`` (the gateway installs it)."""

    max_message: int
    compression: bool
    compression_window_bits: int
    admit: Admit


_policy: Policy | None = None


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for ``key`` (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + ACCEPT_GUID).encode()).digest()).decode()


def _refuse(handler: Any, status: str, reason: str,
            headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    body = reason.encode() + b"\n"
    handler.close_connection = True  # a refused upgrade is not followed by more requests
    handler.start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                    ("Content-Length", str(len(body))), *(headers or [])])
    return [body]


def _wants_upgrade(environ: dict[str, Any]) -> bool:
    tokens = {token.strip().lower() for token in environ.get("HTTP_CONNECTION", "").split(",")}
    return environ.get("REQUEST_METHOD") == "GET" and "upgrade" in tokens and \
        environ.get("HTTP_UPGRADE", "").strip().lower() == "websocket"


def upgrade_websocket(handler: Any) -> list[bytes] | None:
    """gevent-websocket's ``WebSocketHandler.upgrade_websocket``, to RFC 6455 and RFC 7692.

    Returns None (and sets ``handler.websocket``) after a 101, a response
    body after a refusal, or None without a status for a plain request.
    """
    environ, policy = handler.environ, _policy
    if not _wants_upgrade(environ):
        return None  # not a WebSocket request: the WSGI app answers it
    if policy is None:
        return _refuse(handler, "503 Service Unavailable",
                       "the gateway is not ready: greentask.gateway.handshake.install() "
                       "was not called")
    if handler.request_version != "HTTP/1.1":
        return _refuse(handler, "400 Bad Request", "a WebSocket handshake needs HTTP/1.1")
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip() != VERSION:
        return _refuse(handler, "426 Upgrade Required",
                       "this server speaks WebSocket version 13 (RFC 6455)",
                       [("Sec-WebSocket-Version", VERSION)])
    refusal = policy.admit(environ)
    if refusal is not None:
        status, body = refusal
        return _refuse(handler, status, body.decode(errors="replace").rstrip("\n"))
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid_key = False
    if not valid_key:
        return _refuse(handler, "400 Bad Request",
                       "Sec-WebSocket-Key must be 16 bytes, base64-encoded")
    headers = [("Upgrade", "websocket"), ("Connection", "Upgrade"),
               ("Sec-WebSocket-Accept", accept_key(key))]
    extensions = []
    deflate = deflate_for(environ.get("HTTP_SEC_WEBSOCKET_EXTENSIONS", ""),
                          policy.compression_window_bits, policy.max_message) \
        if policy.compression else None
    if deflate is not None:
        extensions.append(deflate[0])
        headers.append(("Sec-WebSocket-Extensions", deflate[1]))
    handler.websocket = FramedSocket(environ, handler, policy.max_message, extensions)
    environ.update({"wsgi.websocket_version": VERSION, "wsgi.websocket": handler.websocket})
    handler.start_response("101 Switching Protocols", headers)
    return None


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


def install(policy: Policy) -> None:
    """Put the handshake and the access log into gevent-websocket's handler (idempotent)."""
    global _policy
    _policy = policy
    ws_handler.WebSocketHandler.upgrade_websocket = upgrade_websocket
    ws_handler.WebSocketHandler.log_request = _log_request
