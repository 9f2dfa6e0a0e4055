"""What the master opens before it patches and forks: its pidfile and sockets.

The task port (shared by every worker), the control socket and, when
``[worker] metrics_bind`` is set, the metrics port. They are the operating
system's sockets, made before gevent's monkey-patching, so the master never
has a hub (see :func:`greentask.daemon.preload.prepare_master`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from greentask.config import Config, control_socket_path
from greentask.daemon.control import ControlError, ControlServer, remove_pidfile, write_pidfile
from greentask.daemon.listener import BindError, bind_listener
from greentask.daemon.oneshot import OneShotServer


class EndpointError(Exception):
    """The pidfile or a socket cannot be opened; the message says which and why."""


@dataclass
class Endpoints:
    """The master's pidfile and sockets, open."""

    listener: socket.socket
    control: ControlServer
    metrics: OneShotServer | None
    pidfile: str | None

    @classmethod
    def open(cls, config: Config, handle_command: Callable[[dict[str, Any]], dict[str, Any]],
             metrics_snapshot: Callable[[], Any]) -> Endpoints:
        """Write the pidfile, bind the task port, the control socket and metrics
        (``/metrics``, and ``/status``: the control socket's status reply).

        Raises :class:`EndpointError`, with whatever it had opened closed again.
        """
        worker = config.worker
        opened: list[Any] = []
        try:
            if worker.pidfile:
                write_pidfile(worker.pidfile)
            listener = bind_listener(worker.bind)
            opened.append(listener)
            control = ControlServer(control_socket_path(config), handle_command)
            opened.append(control)
            metrics = None
            if worker.metrics_bind:
                # Imported only when used: prometheus_client and what it imports
                # add about 2 MiB to the master, which every worker would map too.
                from greentask.daemon.metrics import MetricsServer
                metrics = MetricsServer(worker.metrics_bind, metrics_snapshot, handle_command,
                                        worker.auth_token_file)
        except (BindError, ControlError, OSError) as exc:
            for server in opened:
                server.close()
            if worker.pidfile:
                remove_pidfile(worker.pidfile)
            raise EndpointError(str(exc)) from None
        return cls(listener, control, metrics, worker.pidfile)

    @property
    def servers(self) -> list[OneShotServer]:
        """The servers the master's loop answers: the control socket and the metrics."""
        return [self.control] if self.metrics is None else [self.control, self.metrics]

    def describe(self, processes: str) -> str:
        """Every address served, and ``processes``, for the start-up line."""
        host, port = self.listener.getsockname()[:2]
        text = f"listening at {host}:{port} with {processes}; control socket {self.control.path}"
        if self.metrics is not None:
            host, port = self.metrics.listener.getsockname()[:2]
            text += f"; metrics at http://{host}:{port}/metrics"
        return text

    def close_in_child(self) -> None:
        """A forked child keeps the task port only."""
        for fd in self.control.fds():
            os.close(fd)

    def close(self) -> None:
        """Close every socket and remove the pidfile (and the control socket's file)."""
        for server in (self.listener, self.control, self.metrics):
            if server is not None:
                server.close()
        if self.pidfile:
            remove_pidfile(self.pidfile)
