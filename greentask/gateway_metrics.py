"""Prometheus metrics of the WebSocket gateway, served at ``GET /metrics``.

Each gunicorn worker process counts its own sockets and messages. With
several workers, one scrape reaches one of them, so the counts live in files
instead (prometheus_client's multiprocess mode): ``conf/gunicorn.conf.py``
sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers start and marks each
dead worker, and a scrape then sums every worker. Without that variable (the
bare ``gunicorn -k ...`` command, one worker) the counts stay in memory.
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

#: The environment variable of prometheus_client's multiprocess mode.
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"

#: This process's metrics (what a scrape sees when not in multiprocess mode).
REGISTRY = CollectorRegistry()

SOCKETS_OPEN = Gauge("greentask_gateway_sockets", "WebSockets open now.",
                     multiprocess_mode="livesum", registry=REGISTRY)
SOCKETS_OPENED = Counter("greentask_gateway_sockets_opened", "WebSockets accepted.",
                         registry=REGISTRY)
MESSAGES = Counter("greentask_gateway_messages",
                   "Messages answered, by final event: complete, or the error's type.",
                   ["outcome"], registry=REGISTRY)
DROPPED = Counter("greentask_gateway_results_dropped",
                  "Events not delivered because their socket had closed.", registry=REGISTRY)


def render() -> bytes:
    """The metrics in Prometheus's text format (every worker's, in multiprocess mode)."""
    if os.environ.get(MULTIPROCESS_DIR):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)
