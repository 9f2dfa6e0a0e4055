"""Tiny request/response servers for the master's poll loop.

The master has no event loop and must never block, so its control socket and
its metrics endpoint are served the same way: listening socket and clients are
non-blocking; when a client's request is in (a line, unless
:meth:`OneShotServer.request_end` says otherwise), :meth:`OneShotServer.respond`
turns it into the reply bytes, which are sent at once (each client's send
buffer holds a whole reply), and the connection is closed. A client that
does not finish its request within :data:`CLIENT_DEADLINE` seconds is
dropped, so a stuck client cannot hold up supervision.

Nothing a client does may stop the master: each server holds at most
:data:`MAX_CLIENTS` clients (more wait in the listen backlog, which the
kernel bounds), a failed accept (out of descriptors) pauses accepting for a
moment instead of spinning, and an error while answering drops that client
only.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import time

log = logging.getLogger("greentask.master")

#: Seconds a client has to send its request line.
CLIENT_DEADLINE = 2.0
#: Longest request accepted.
MAX_REQUEST = 4096
#: Send buffer asked for each client, so that one non-blocking send takes a
#: whole reply (the kernel caps it at net.core.wmem_max, 208 KiB by default).
SEND_BUFFER = 1024 * 1024
#: Clients one server holds at once; the next wait in the listen backlog.
MAX_CLIENTS = 64
#: How long accepting pauses after the process ran out of descriptors (seconds).
ACCEPT_PAUSE = 0.5


class OneShotServer:
    """Accept, read one line, answer, close; never block. Subclasses define ``respond``."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.listener.setblocking(False)
        self._clients: dict[int, tuple[socket.socket, bytearray, float]] = {}
        #: Accepting resumes at this time (after running out of descriptors).
        self._accept_at = 0.0

    def respond(self, request: bytes) -> bytes:
        """The reply to a request (subclasses)."""
        raise NotImplementedError

    def request_end(self, buffer: bytearray) -> int | None:
        """Where the request in ``buffer`` ends, or None while it is incomplete: after
        its first line, unless a subclass frames requests otherwise."""
        end = buffer.find(b"\n")
        return None if end < 0 else end + 1

    def _accepting(self, now: float) -> bool:
        return len(self._clients) < MAX_CLIENTS and now >= self._accept_at

    def fds(self) -> list[int]:
        """Descriptors the master's poll should watch for reading."""
        if self._accepting(time.monotonic()):
            return [self.listener.fileno(), *self._clients]
        return list(self._clients)

    def timeout(self, longest: float) -> float:
        """How long the master may sleep before a client's deadline passes."""
        wake = [deadline for _, _, deadline in self._clients.values()]
        if self._accept_at:
            wake.append(self._accept_at)
        if not wake:
            return longest
        return max(0.0, min(longest, min(wake) - time.monotonic()))

    def serve(self, readable: set[int]) -> None:
        """Accept and answer whatever is ready; drop clients past their deadline."""
        if self.listener.fileno() in readable:
            self._accept()
        for fd in readable:
            if fd in self._clients:
                try:
                    self._read(fd)
                except Exception:
                    log.exception("%s: error while answering a client; it is dropped, "
                                  "the master goes on", type(self).__name__)
                    if fd in self._clients:
                        self._drop(fd)
        now = time.monotonic()
        for fd, (_, _, deadline) in list(self._clients.items()):
            if now > deadline:
                self._drop(fd)

    def _accept(self) -> None:
        while len(self._clients) < MAX_CLIENTS:
            try:
                fd, _ = self.listener._accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of descriptors (EMFILE, ENFILE) or memory: the listener
                # stays readable, so pause instead of waking at once again.
                self._accept_at = time.monotonic() + ACCEPT_PAUSE
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    log.warning("%s: cannot accept (%s); raise the master's descriptor limit "
                                "(ulimit -n) if this lasts", type(self).__name__, exc.strerror)
                return
            self._accept_at = 0.0
            # Not accept(): in the monkey-patched master it makes gevent
            # sockets, whose creation starts a hub. Same class as the listener.
            sock = type(self.listener)(self.listener.family, self.listener.type,
                                       self.listener.proto, fileno=fd)
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
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
        end = self.request_end(buffer)
        if end is None and data and len(buffer) < MAX_REQUEST:
            return
        reply = self.respond(bytes(buffer[:end]))
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
