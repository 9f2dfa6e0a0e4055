"""Prometheus metrics of the WebSocket gateway, served at ``GET /metrics``.

Each gunicorn worker process counts its own sockets and messages. With
several workers, one scrape reaches one of them, so the counts live in files
instead (prometheus_client's multiprocess mode): ``conf/gunicorn.conf.py``
sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers start and marks each
dead worker, and a scrape then sums every worker. Without that variable (the
bare ``gunicorn -k ...`` command, one worker) the counts stay in memory.

Per-message counts are kept as plain integers (:class:`Tally`) and added to
the Prometheus counters once a second and before each scrape: a counter
update in multiprocess mode takes a lock and writes a file mapping, which
cost a quarter of the throughput of two workers when done per message.
"""

from __future__ import annotations

import collections
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


#: How often each worker adds its tallies to the Prometheus counters (seconds);
#: a scrape can miss other workers' last second.
FLUSH_INTERVAL = 1.0


class Tally:
    """This process's per-message counts, until :meth:`flush` adds them to the counters."""

    def __init__(self) -> None:
        self.messages: collections.Counter[str] = collections.Counter()
        self.dropped = 0

    def flush(self) -> None:
        """Add what was counted since the last flush to the Prometheus counters."""
        messages, self.messages = self.messages, collections.Counter()
        for outcome, count in messages.items():
            MESSAGES.labels(outcome).inc(count)
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            DROPPED.inc(dropped)


#: The tally of this process.
TALLY = Tally()


def render() -> bytes:
    """The metrics in Prometheus's text format (every worker's, in multiprocess mode)."""
    TALLY.flush()
    if os.environ.get(MULTIPROCESS_DIR):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)
