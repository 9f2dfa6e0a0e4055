"""Which server a client's request goes to: the servers, their connections, which are down.

A :class:`ServerPool` holds a client's servers and its open connections (of
any type that says whether it is ``usable``: the threaded and the asyncio
transports each have their own). :meth:`ServerPool.pick` gives the next
usable connection in turn, or None when one more should be opened first;
an :class:`Opening` is one round of trying the servers for it, skipping
those that refused a connection in the last :data:`DOWN_RETRY_DELAY`
seconds (or trying every one when all did). No I/O happens here.
"""

from __future__ import annotations

import itertools
import ssl
import time
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar

from greentask.address import parse_address
from greentask.calls import MAX_ATTEMPTS, Call
from greentask.errors import ConnectionFailed

#: Seconds a server that refused a connection is skipped before it is tried again.
DOWN_RETRY_DELAY = 1.0


class _Usable(Protocol):
    @property
    def usable(self) -> bool: ...


T = TypeVar("T", bound=_Usable)


class ServerPool(Generic[T]):
    """The servers, their open connections (of type T), and which ones are down."""

    def __init__(self, servers: Iterable[str], connections_per_server: int) -> None:
        self.servers = [_parse_server(server) for server in servers]
        if not self.servers:
            raise ValueError("a task client needs at least one server, such as "
                             "'127.0.0.1:12345'")
        self.target = connections_per_server * len(self.servers)
        self.connections: list[T] = []
        self.closed = False
        self._down_until: dict[tuple[str, int], float] = {}
        self._server_turn = itertools.count()
        self._connection_turn = itertools.count()

    def pick(self) -> T | None:
        """The next usable connection, or None when one more should be opened first."""
        if self.closed:
            raise ConnectionFailed("the client is closed")
        if len(self.connections) >= self.target:
            connection = self.connections[next(self._connection_turn) % len(self.connections)]
            if connection.usable:
                return connection
        self.connections = [c for c in self.connections if c.usable]
        if len(self.connections) < self.target:
            return None
        return self.any()

    def close(self) -> list[T]:
        """Take no more calls; return the open connections, for the transport to close."""
        self.closed = True
        connections, self.connections = self.connections, []
        return connections

    def any(self) -> T | None:
        """The next open connection, if there is one."""
        if not self.connections:
            return None
        return self.connections[next(self._connection_turn) % len(self.connections)]

    def candidates(self) -> list[tuple[str, int]]:
        """Servers to try for a new connection, in turn: those not marked down,
        or every one when all are."""
        now = time.monotonic()
        turn = next(self._server_turn)
        ordered = [self.servers[(turn + i) % len(self.servers)] for i in range(len(self.servers))]
        return [address for address in ordered if self._down_until.get(address, 0) <= now] \
            or ordered

    def mark_down(self, address: tuple[str, int]) -> None:
        """``address`` refused a connection: skip it for :data:`DOWN_RETRY_DELAY` s."""
        self._down_until[address] = time.monotonic() + DOWN_RETRY_DELAY

    def opening(self) -> Opening[T]:
        """One round of trying servers for a new connection."""
        return Opening(self)

    def describe(self) -> str:
        """The servers as HOST:PORT, for messages."""
        return ", ".join(f"{host}:{port}" for host, port in self.servers)

    def undeliverable(self, call: Call, last_error: str) -> ConnectionFailed:
        """The error of a call sent :data:`MAX_ATTEMPTS` times without an answer."""
        return ConnectionFailed(
            f"task {call.function!r} could not be delivered after {MAX_ATTEMPTS} attempts "
            f"(last: {call.refusal or last_error or 'no connection'}); servers: "
            f"{self.describe()}")


class Opening(Generic[T]):
    """One round of connecting: each candidate in turn, what failed, and the way out.

    A transport tries ``for address in opening.addresses``, reports
    :meth:`failed` or :meth:`opened`, and ends with :meth:`fallback`.
    """

    def __init__(self, pool: ServerPool[T]) -> None:
        self._pool = pool
        self.addresses = pool.candidates()
        self._failures: list[tuple[tuple[str, int], OSError]] = []

    def failed(self, address: tuple[str, int], exc: OSError) -> None:
        """``address`` did not take the connection."""
        self._pool.mark_down(address)
        self._failures.append((address, exc))

    def opened(self, connection: T) -> T:
        """A new connection is open: the pool keeps it."""
        self._pool.connections.append(connection)
        return connection

    def fallback(self) -> T:
        """Every candidate failed: an open connection, or :class:`ConnectionFailed`."""
        connection = self._pool.any()
        if connection is None:
            raise no_connection(self._failures)
        return connection


def no_connection(failures: list[tuple[tuple[str, int], OSError]]) -> ConnectionFailed:
    """Why no connection could be made, and what to do about it."""
    errors = "; ".join(f"{host}:{port}: {exc.strerror or exc or type(exc).__name__}"
                       for (host, port), exc in failures)
    if all(isinstance(exc, ssl.SSLCertVerificationError) for _, exc in failures):
        # The server answered: it runs, but its certificate was not accepted.
        return ConnectionFailed(
            f"the task server answered but its TLS certificate was not accepted ({errors}): "
            "give the CA certificates that signed the server's certificate (greentask "
            "call --ca-certs FILE, [gateway] ca_certs, or greentask.tls.client_context("
            "ca_certs=FILE)) and connect by a name or IP address that the certificate "
            "names")
    return ConnectionFailed(f"cannot connect to any task server ({errors}); is greentask "
                            "running there? (start it with scripts/run)")


def _parse_server(server: str) -> tuple[str, int]:
    try:
        return parse_address(server)
    except ValueError as exc:
        raise ValueError(f"bad server {server!r}: {exc}") from None
