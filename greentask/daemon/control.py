"""The master's control channel: a Unix socket for status, reload, stop and scale.

Theory of operation
-------------------
The master has no event loop, only a ``poll`` over its wake-up pipe, so the
control socket is served from that same ``poll``
(:class:`~greentask.daemon.oneshot.OneShotServer`). A client sends one JSON line,
``{"command": "status"}``, and gets one JSON line back, then the master closes
the connection. The socket file has mode 0600: only the master's user (and
root) can control it, and it is never on the network.

:func:`send_command` is the client side, used by ``greentask status`` and
friends; :func:`format_status` renders a status reply as a table.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Collection
from typing import Any

import ujson

from greentask.daemon.activity import TaskKey
from greentask.daemon.lifecycle import processes_text
from greentask.daemon.oneshot import OneShotServer
from greentask.errors import GreentaskError
from greentask.protocol import encode_line

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlError(GreentaskError):
    """The control socket cannot be reached, or the master refused the command."""


class NoMaster(ControlError):
    """No master listens at the control socket (none runs with this config, or it exited)."""


class Unanswered(ControlError):
    """The master took the command but did not answer in time: it may have carried it out."""


class ControlServer(OneShotServer):
    """The master's control socket: one JSON command in, one JSON reply out."""

    def __init__(self, path: str, handle: Handler) -> None:
        self.path = path
        self._handle = handle
        super().__init__(self._bind(path))

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
        return sock

    def respond(self, request: bytes) -> bytes:
        """Run one command line; the reply line."""
        return encode_line(self._run(request))

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

    def close(self) -> None:
        """Close every socket and remove the socket file."""
        super().close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def wanted_processes(command: dict[str, Any], most: int) -> int:
    """The process count a ``scale`` command asks for; ControlError when it cannot be."""
    processes = command.get("processes")
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise ControlError("scale needs a whole number of processes, at least 1")
    if processes > most:
        raise ControlError(f"scale {processes}: more than [worker] max_processes = {most}; "
                           "nothing changed (raise max_processes in the config and reload, if "
                           "this machine can run that many)")
    return processes


def cancel_target(command: dict[str, Any], live: Collection[int]) -> tuple[int, TaskKey]:
    """The worker (one of the ``live`` pids) and task key a ``cancel`` command names;
    ControlError when it names none."""
    pid, key = command.get("pid"), command.get("key")
    if not isinstance(pid, int) or not (
            isinstance(key, list) and len(key) == 2 and all(isinstance(k, int) for k in key)):
        raise ControlError('cancel takes {"command": "cancel", "pid": PID, "key": KEY}, '
                           'both as status lists the task under "running"')
    if pid not in live:
        raise ControlError(f"no worker has pid {pid} (it may have exited meanwhile)")
    return pid, (key[0], key[1])


def send_command(path: str, command: str, timeout: float = 5.0,
                 **arguments: Any) -> dict[str, Any]:
    """Send one command to the master at ``path``; return its reply.

    Raises :class:`ControlError` when the master cannot be reached or says no.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(encode_line({"command": command, **arguments}))
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise NoMaster(f"no greentask master answers at {path}: is it running with this "
                       "config (and --bind, if it was started with one)? Start it with "
                       "scripts/run") from None
    except TimeoutError:
        raise Unanswered(f"the master at {path} did not answer within {timeout:g} s") from None
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
             f"{processes_text(master['processes'])} wanted, up "
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
