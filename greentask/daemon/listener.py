"""The task port's listening socket: bound once by the master, shared by every worker."""

from __future__ import annotations

import errno
import socket

from greentask.errors import GreentaskError

#: Listen backlog: connections the kernel queues while every worker is busy.
LISTEN_BACKLOG = 2048


class BindError(GreentaskError):
    """The task port cannot be opened."""


def bind_listener(address: tuple[str, int], backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """Open the listening socket that every worker will share."""
    host, port = address
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                    flags=socket.AI_PASSIVE)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise BindError(f"cannot listen on {host}:{port}: {exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted sockets inherit it on Linux: no setsockopt per connection.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        hint = ("another program (another greentask?) uses that port: stop it, or choose "
                "another port with --bind or [worker] bind") if exc.errno == errno.EADDRINUSE \
            else "check [worker] bind"
        raise BindError(f"cannot listen on {host}:{port}: {exc.strerror}; {hint}") from None
    return sock
