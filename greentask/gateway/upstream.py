"""The gateway's side of the task port: the TaskClient made from ``[gateway]``.

``greentask call`` uses the same TLS settings, so both build them here.
"""

from __future__ import annotations

import ssl
from typing import Any

from greentask import tls
from greentask.client import Spawn, TaskClient


def client_context(gateway: Any, ca_certs: str | None = None) -> ssl.SSLContext:
    """A TLS client context from ``[gateway]`` ca_certs, certfile and keyfile.

    ``ca_certs`` overrides the section's (``greentask call --ca-certs``).
    """
    return tls.client_context(ca_certs or gateway.ca_certs, gateway.certfile, gateway.keyfile)


def task_client(gateway: Any, spawn: Spawn | None = None) -> TaskClient:
    """The TaskClient for ``[gateway]`` task_servers, with its timeout, token and TLS
    (``spawn``: see :class:`~greentask.client.TaskClient`)."""
    servers = [f"{host}:{port}" for host, port in gateway.task_servers]
    context = client_context(gateway) if gateway.tls else None
    return TaskClient(servers, timeout=gateway.call_timeout,
                      auth_token=gateway.auth_token_file, ssl_context=context, spawn=spawn)
