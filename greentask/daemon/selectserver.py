"""Tiny request/response servers for the master's ``select`` loop.

The master has no event loop and must never block, so its control socket and
its metrics endpoint are served the same way: listening socket and clients are
non-blocking; when a client's first line is in, :meth:`OneShotServer.respond`
turns it into the reply bytes, which are sent at once, and the connection is
closed. A client that does not finish its line within :data:`CLIENT_DEADLINE`
seconds is dropped, so a stuck client cannot hold up supervision.
"""

from __future__ import annotations

import contextlib
import socket
import time

#: Seconds a client has to send its request line.
CLIENT_DEADLINE = 2.0
#: Longest request line accepted.
MAX_REQUEST = 4096


class OneShotServer:
    """Accept, read one line, answer, close; never block. Subclasses define ``respond``."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.listener.setblocking(False)
        self._clients: dict[int, tuple[socket.socket, bytearray, float]] = {}

    def respond(self, line: bytes) -> bytes:
        """The reply to a request line (subclasses)."""
        raise NotImplementedError

    def fds(self) -> list[int]:
        """Descriptors the master's ``select`` should watch for reading."""
        return [self.listener.fileno(), *self._clients]

    def timeout(self, longest: float) -> float:
        """How long the master may sleep before a client's deadline passes."""
        if not self._clients:
            return longest
        first = min(deadline for _, _, deadline in self._clients.values())
        return max(0.0, min(longest, first - time.monotonic()))

    def serve(self, readable: list[int]) -> None:
        """Accept and answer whatever is ready; drop clients past their deadline."""
        if self.listener.fileno() in readable:
            self._accept()
        for fd in readable:
            if fd in self._clients:
                self._read(fd)
        now = time.monotonic()
        for fd, (_, _, deadline) in list(self._clients.items()):
            if now > deadline:
                self._drop(fd)

    def _accept(self) -> None:
        while True:
            try:
                fd, _ = self.listener._accept()
            except (BlockingIOError, InterruptedError):
                return
            # Not accept(): in the monkey-patched master it makes gevent
            # sockets, whose creation starts a hub. Same class as the listener.
            sock = type(self.listener)(self.listener.family, self.listener.type,
                                       self.listener.proto, fileno=fd)
            sock.setblocking(False)
            self._clients[sock.fileno()] = (sock, bytearray(),
                                            time.monotonic() + CLIENT_DEADLINE)

    def _read(self, fd: int) -> None:
        sock, buffer, _ = self._clients[fd]
        try:
            data = sock.recv(MAX_REQUEST)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buffer += data
        if b"\n" not in buffer and data and len(buffer) < MAX_REQUEST:
            return
        reply = self.respond(bytes(buffer).split(b"\n", 1)[0])
        # The reply is small; a client that does not read it loses it.
        with contextlib.suppress(OSError):
            sock.send(reply)
        self._drop(fd)

    def _drop(self, fd: int) -> None:
        sock, _, _ = self._clients.pop(fd)
        sock.close()

    def close(self) -> None:
        """Close the listener and every client."""
        for fd in list(self._clients):
            self._drop(fd)
        self.listener.close()
