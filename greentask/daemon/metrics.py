"""Prometheus metrics of the task daemon, served by the master.

The numbers come from the same shared-memory scoreboard as ``greentask
status`` (so the two agree), plus totals the master keeps for workers that
have exited, so counters never go backwards when a worker is replaced. The
endpoint is served from the master's ``poll`` loop, like the control socket
(:class:`~greentask.daemon.oneshot.OneShotServer`); workers only time their
tasks, and only when ``[worker] metrics_bind`` is set.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterable
from typing import Any

import ujson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from greentask.daemon import scoreboard
from greentask.daemon.oneshot import OneShotServer

#: What a scrape sees: (totals per scoreboard field, per-worker rows, master facts).
Snapshot = Callable[[], tuple[list[float], list[dict[str, Any]], dict[str, Any]]]

#: Label values of the outcomes, in the order of scoreboard.OUTCOMES.
OUTCOME_LABELS = ("ok", "failed", "timeout", "cancelled")


class DaemonCollector(Collector):
    """Turns a snapshot of the daemon into metric families."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Any]:
        totals, workers, master = self.snapshot()
        tasks = CounterMetricFamily("greentask_tasks", "Tasks finished, by function and outcome.",
                                    labels=["function", "outcome"])
        for function, counts in sorted(master["functions"].items()):
            for outcome, count in zip(OUTCOME_LABELS, counts, strict=True):
                tasks.add_metric([function, outcome], count)
        yield tasks
        buckets, running = [], 0.0
        for i, bound in enumerate((*scoreboard.DURATION_BUCKETS, float("inf"))):
            running += totals[scoreboard.DURATION_BUCKET + i]
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        yield HistogramMetricFamily("greentask_task_duration_seconds",
                                    "How long tasks ran.", buckets=buckets,
                                    sum_value=totals[scoreboard.DURATION_SUM])
        for name, text, field in (
                ("greentask_tasks_in_flight", "Tasks running now.", "inflight"),
                ("greentask_connections", "Open client connections.", "connections")):
            yield GaugeMetricFamily(name, text, value=sum(w[field] for w in workers))
        rss = GaugeMetricFamily("greentask_worker_rss_bytes", "Resident memory per worker.",
                                labels=["pid"])
        for worker in workers:
            rss.add_metric([str(worker["pid"])], worker["rss"])
        yield rss
        yield GaugeMetricFamily("greentask_workers", "Worker processes alive.",
                                value=len(workers))
        yield GaugeMetricFamily("greentask_workers_wanted", "Worker processes configured.",
                                value=master["processes"])
        yield GaugeMetricFamily("greentask_generation", "Reload generation.",
                                value=master["generation"])
        restarts = CounterMetricFamily("greentask_worker_restarts",
                                       "Workers replaced, by cause.", labels=["cause"])
        for cause, count in sorted(master["restarts"].items()):
            restarts.add_metric([cause], count)
        yield restarts


class MetricsServer(OneShotServer):
    """``GET /metrics`` in Prometheus's text format, from the master's loop."""

    def __init__(self, address: tuple[str, int], snapshot: Snapshot,
                 status: Callable[[], dict[str, Any]]) -> None:
        self.status = status
        self.registry = CollectorRegistry()
        self.registry.register(DaemonCollector(snapshot))
        super().__init__(self._bind(address))

    @staticmethod
    def _bind(address: tuple[str, int]) -> socket.socket:
        sock = socket.create_server(address, backlog=16) if address[1] else None
        if sock is None:
            raise OSError(errno.EINVAL, "metrics_bind needs a port")
        return sock

    def respond(self, line: bytes) -> bytes:
        """An HTTP/1.0 response to a request line: GET /metrics, or GET /status (JSON)."""
        parts = line.split()
        path = parts[1].split(b"?")[0] if len(parts) >= 2 and parts[0] == b"GET" else b""
        if path == b"/metrics":
            body = generate_latest(self.registry)
            head = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
        elif path == b"/status":
            # What `greentask status --json` prints, for dashboards on other hosts.
            body = ujson.dumps(self.status()).encode() + b"\n"
            head = "200 OK", "application/json"
        else:
            body = b"GET /metrics and GET /status are served here\n"
            head = "404 Not Found", "text/plain; charset=utf-8"
        return (f"HTTP/1.0 {head[0]}\r\nContent-Type: {head[1]}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
