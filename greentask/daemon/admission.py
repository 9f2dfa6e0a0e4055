"""Who a connection is admitted as, and the limits every connection of a process enforces.

A :class:`~greentask.daemon.connection.Connection` asks its :class:`Admission`
(the process's server, or a :class:`PeerOverLimit` for a peer past
``max_connections_per_peer``) whether requests run, and tells it about
peers it refuses; :class:`ConnectionLimits` are the ``[worker]`` settings
each connection applies.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any, Protocol

from greentask.errors import RemoteError, ShuttingDown
from greentask.protocol import DEFAULT_MAX_QUEUED, parse_hello


@dataclass(frozen=True)
class ConnectionLimits:
    """What every connection of a process enforces (from ``[worker]``)."""

    max_line: int
    max_depth: int
    max_inflight: int
    #: The shared token a peer must send first, or None.
    auth_token: bytes | None = None
    #: Unsent reply bytes past which a peer that reads nothing is cut off.
    max_queued: int = DEFAULT_MAX_QUEUED
    #: Seconds a peer has to send its token (when one is required).
    hello_timeout: float = 5.0

    def token_matches(self, line: bytes) -> bool:
        """True when ``line`` is a hello with the right token (compared in constant time)."""
        token = parse_hello(line)
        return token is not None and self.auth_token is not None and \
            hmac.compare_digest(token.encode(), self.auth_token)

    @classmethod
    def from_settings(cls, settings: Any) -> ConnectionLimits:
        """The limits of a ``config.worker`` section."""
        token = settings.auth_token_file
        return cls(settings.max_line, settings.max_json_depth,
                   settings.max_inflight_per_connection, token.encode() if token else None,
                   settings.max_queued_replies, settings.hello_timeout)


class Admission(Protocol):
    """What a connection asks of the process serving it."""

    @property
    def refusal(self) -> RemoteError | None:
        """What every request is answered with instead of running (a drain), or None."""

    def note_refused(self, peer: str, reason: str) -> None:
        """Count (and log, now and then) a peer refused for ``reason``."""


class PeerOverLimit:
    """The admission of a connection past ``max_connections_per_peer``: told to close,
    every request refused (not run), so the peer uses the connections it has."""

    def __init__(self, peer: str, limit: int) -> None:
        self.refusal = ShuttingDown(
            f"too many connections from {peer} to this worker process ([worker] "
            f"max_connections_per_peer = {limit}); the task was not run: send it on one of "
            "your open connections")

    def note_refused(self, peer: str, reason: str) -> None:
        """Refusals of this connection were counted when it was admitted."""
