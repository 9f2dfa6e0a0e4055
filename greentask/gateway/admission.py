"""Who may open ``/ws``: the page's origin, then the application's own check.

Theory of operation
-------------------
A WebSocket handshake is admitted in two steps, before any task can run:

1. **Origin.** Browsers always send ``Origin``; it must be one of
   ``[gateway] allowed_origins``, compared as browsers send it (scheme, host
   and port; the ``Host`` header is never trusted, so DNS rebinding and
   ``https://`` look-alikes do not pass). A handshake without ``Origin`` (not
   a browser) is refused unless ``[gateway] allow_no_origin = true``.
2. **Authorization.** ``[gateway] authorize = module:function`` is called
   with the WSGI environ (cookies, headers, peer address) and returns who the
   caller is, or raises :class:`Refuse` (401, 403). The default,
   :func:`loopback_only`, admits only peers on this host, so the demo works
   and a gateway reachable from elsewhere runs nothing until the operator
   names the application's check (its session cookie, say).

A refusal is an HTTP response with a one-line reason for the person or
program that made the request; the operator's detail goes to the log.
"""

from __future__ import annotations

import importlib
import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from greentask.config.converters import normalize_origin
from greentask.errors import ConfigError
from greentask.refusals import RefusalCounter

log = logging.getLogger("greentask.gateway")

#: The environ key that holds what ``authorize`` returned for an admitted socket.
CALLER_KEY = "greentask.caller"

Authorize = Callable[[dict[str, Any]], Any]
#: A refusal: (HTTP status line, body), or None to admit.
Verdict = tuple[str, bytes] | None

_STATUS_LINES = {400: "400 Bad Request", 401: "401 Unauthorized", 403: "403 Forbidden"}


class Refuse(Exception):
    """Raised by an ``authorize`` function: refuse this handshake with ``status``."""

    def __init__(self, status: int, reason: str) -> None:
        if status not in _STATUS_LINES:
            raise ValueError(f"Refuse takes 400, 401 or 403, not {status}")
        super().__init__(reason)
        self.status = status
        self.reason = reason


def loopback_only(environ: dict[str, Any]) -> str:
    """The default ``authorize``: admit peers on this host only (the demo)."""
    peer = environ.get("REMOTE_ADDR", "")
    try:
        local = ipaddress.ip_address(peer.split("%")[0]).is_loopback
    except ValueError:
        local = False
    if not local:
        raise Refuse(403, "this gateway admits only local clients")
    return f"local {peer}"


def anyone(environ: dict[str, Any]) -> str:
    """An ``authorize`` that admits every caller the origin check let through."""
    return str(environ.get("REMOTE_ADDR", "?"))


def load_authorize(name: str) -> Authorize:
    """Import ``module:function``; ConfigError saying what is wrong."""
    module_name, _, attribute = name.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except ImportError as exc:
        raise ConfigError(f"[gateway] authorize = {name}: cannot import {module_name!r} "
                         f"({exc})") from None
    except AttributeError:
        raise ConfigError(f"[gateway] authorize = {name}: {module_name!r} has no "
                         f"{attribute!r}") from None
    if not callable(target):
        raise ConfigError(f"[gateway] authorize = {name} is not a function")
    return target


class SocketAdmission:
    """The handshake check of one gateway: origin, then ``authorize``."""

    def __init__(self, allowed_origins: list[str], allow_no_origin: bool,
                 authorize: Authorize) -> None:
        self.any_origin = "*" in allowed_origins
        self.origins = frozenset(o for o in allowed_origins if o != "*")
        self.allow_no_origin = allow_no_origin
        self.authorize = authorize
        self.refusals = RefusalCounter(log, "WebSocket handshake")

    def origin_refusal(self, environ: dict[str, Any]) -> str | None:
        """Why the handshake's ``Origin`` is refused, or None."""
        origin = environ.get("HTTP_ORIGIN")
        if origin is None:
            return None if self.allow_no_origin else (
                "no Origin header: only browsers' pages may open /ws here ([gateway] "
                "allow_no_origin)")
        if self.any_origin:
            return None
        try:
            if normalize_origin(origin) in self.origins:
                return None
        except ValueError:
            pass
        return f"origin {origin} is not allowed: add it to [gateway] allowed_origins"

    def check(self, environ: dict[str, Any]) -> Verdict:
        """None to admit (the caller is put in the environ), else the refusal to send."""
        peer = str(environ.get("REMOTE_ADDR", "?"))
        why = self.origin_refusal(environ)
        if why is not None:
            self.refusals.note(peer, why)
            return _STATUS_LINES[403], why.encode() + b"\n"
        return self.check_caller(environ)

    def check_caller(self, environ: dict[str, Any]) -> Verdict:
        """The authorize hook alone, for the gateway's own pages (same origin, no Origin)."""
        peer = str(environ.get("REMOTE_ADDR", "?"))
        try:
            caller = self.authorize(environ)
        except Refuse as refusal:
            self.refusals.note(peer, f"authorize: {refusal.status} {refusal.reason}")
            return _STATUS_LINES[refusal.status], refusal.reason.encode() + b"\n"
        except Exception:
            log.exception("[gateway] authorize raised; the handshake is refused")
            return "500 Internal Server Error", b"the gateway could not check this request\n"
        if caller is None:
            return _STATUS_LINES[401], b"sign in first\n"
        environ[CALLER_KEY] = caller
        return None
