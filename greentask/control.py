"""The master's control channel: a Unix socket for status, reload, stop and scale.

Theory of operation
-------------------
The master has no event loop, only a ``select`` over its wake-up pipe, so the
control socket is served from that same ``select``: the listening socket and
each accepted client are non-blocking and held in :class:`ControlServer`.
A client sends one JSON line, ``{"command": "status"}``, and gets one JSON
line back, then the master closes the connection. A client that does not
finish its line within :data:`CLIENT_DEADLINE` seconds is dropped, so a stuck
client cannot hold up the master. The socket file has mode 0600: only the
master's user (and root) can control it, and it is never on the network.

:func:`send_command` is the client side, used by ``greentask status`` and
friends; :func:`format_status` renders a status reply as a table.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import ujson

from greentask.errors import GreentaskError

#: Seconds a control client has to send its command.
CLIENT_DEADLINE = 2.0
#: Longest command line accepted.
MAX_COMMAND = 4096

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(GreentaskError):
    """The control socket cannot be reached, or the master refused the command."""


class ControlServer:
    """The master's end: accept, read one command, answer, close; never block."""

    def __init__(self, path: str, handle: Handler) -> None:
        self.path = path
        self._handle = handle
        self._clients: dict[int, tuple[socket.socket, bytearray, float]] = {}
        self.listener = self._bind(path)

    @staticmethod
    def _bind(path: str) -> socket.socket:
        if os.path.exists(path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # left behind by a master that died
            else:
                raise ControlError(f"control socket {path} is in use: is another greentask "
                                   "master running with this config? (set [worker] "
                                   "control_socket or pidfile to tell them apart)")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the file is created 0600
        try:
            sock.bind(path)
        except OSError as exc:
            sock.close()
            raise ControlError(f"cannot create control socket {path}: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        sock.listen(16)
        sock.setblocking(False)
        return sock

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
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            self._clients[sock.fileno()] = (sock, bytearray(),
                                            time.monotonic() + CLIENT_DEADLINE)

    def _read(self, fd: int) -> None:
        sock, buffer, _ = self._clients[fd]
        try:
            data = sock.recv(MAX_COMMAND)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buffer += data
        if b"\n" not in buffer and data and len(buffer) < MAX_COMMAND:
            return
        line = bytes(buffer).split(b"\n", 1)[0]
        self._answer(sock, self._run(line))
        self._drop(fd)

    def _run(self, line: bytes) -> dict[str, Any]:
        try:
            command = ujson.loads(line)
        except ValueError:
            return {"ok": False, "error": "send one JSON object, such as "
                                          '{"command": "status"}'}
        if not isinstance(command, dict) or not isinstance(command.get("command"), str):
            return {"ok": False, "error": 'missing "command"'}
        try:
            return {"ok": True, **self._handle(command)}
        except ControlError as exc:
            return {"ok": False, "error": str(exc)}

    @staticmethod
    def _answer(sock: socket.socket, reply: dict[str, Any]) -> None:
        # The reply is small; a client that does not read it loses it.
        with contextlib.suppress(OSError):
            sock.send(ujson.dumps(reply).encode() + b"\n")

    def _drop(self, fd: int) -> None:
        sock, _, _ = self._clients.pop(fd)
        sock.close()

    def close(self) -> None:
        """Close every socket and remove the socket file."""
        for fd in list(self._clients):
            self._drop(fd)
        self.listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def send_command(path: str, command: str, timeout: float = 5.0,
                 **arguments: Any) -> dict[str, Any]:
    """Send one command to the master at ``path``; return its reply.

    Raises :class:`ControlError` when the master cannot be reached or says no.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(ujson.dumps({"command": command, **arguments}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlError(f"no greentask master answers at {path}: is it running with "
                           "this config? (start it with scripts/run)") from None
    except OSError as exc:
        raise ControlError(f"cannot talk to the master at {path}: {exc}") from None
    try:
        reply = ujson.loads(data)
    except ValueError:
        raise ControlError(f"the master at {path} sent no valid reply") from None
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "the master refused the command")))
    return reply


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (seconds, "s")]
    shown = [f"{value}{unit}" for value, unit in parts if value][:2]
    return " ".join(shown) or "0s"


def _megabytes(size: float) -> str:
    return f"{size / 1048576:.1f}M"


_COLUMNS = ("pid", "gen", "state", "rss", "conns", "inflight", "done", "failed", "timeouts",
            "tasks/s", "uptime")


def format_status(status: dict[str, Any]) -> str:
    """A status reply as a table, one row per worker process."""
    master = status["master"]
    lines = [f"greentask master [{master['name']}] pid {master['pid']}, listening at "
             f"{master['bind']}, generation {master['generation']}, "
             f"{master['processes']} worker processes wanted, up "
             f"{_duration(master['uptime'])}"]
    rows = [_COLUMNS]
    for worker in status["workers"]:
        state = worker["state"]
        if state == "ready":
            state = "busy" if worker["inflight"] else "idle"
        rows.append((str(worker["pid"]), str(worker["generation"]), state,
                     _megabytes(worker["rss"]), str(worker["connections"]),
                     str(worker["inflight"]), str(worker["done"]), str(worker["failed"]),
                     str(worker["timed_out"]), f"{worker['tasks_per_second']:.1f}",
                     _duration(worker["uptime"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip() for row in rows]
    return "\n".join(lines)


def write_pidfile(path: str) -> None:
    """Write this process's pid to ``path``; refuse if a live process owns it."""
    try:
        with open(path) as file:
            other = int(file.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        other = 0
    if other and other != os.getpid():
        try:
            os.kill(other, 0)
        except ProcessLookupError:
            pass  # stale: its master died without removing it
        else:
            raise ControlError(f"pidfile {path} names process {other}, which is running: "
                               "is greentask already started? Stop it first, or use another "
                               "[worker] pidfile")
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as file:
        file.write(f"{os.getpid()}\n")
    os.replace(temporary, path)


def remove_pidfile(path: str) -> None:
    """Remove ``path`` if it still names this process."""
    with contextlib.suppress(OSError, ValueError):
        with open(path) as file:
            if int(file.read().strip()) == os.getpid():
                os.unlink(path)
