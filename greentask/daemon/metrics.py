"""Prometheus metrics of the task daemon, served by the master.

The numbers come from the same shared-memory scoreboard as ``greentask
status`` (so the two agree), plus totals the master keeps for workers that
have exited, so counters never go backwards when a worker is replaced. The
endpoint is served from the master's ``poll`` loop, like the control socket
(:class:`~greentask.daemon.oneshot.OneShotServer`); workers only time their
tasks, and only when ``[worker] metrics_bind`` is set.

Beside ``GET /metrics``, the same port serves the dashboard's two needs:
``GET /status`` (what ``greentask status --json`` prints) and ``POST
/cancel`` (a running task, named as ``/status`` lists it), which takes the
task port's token when the daemon has one (``Authorization: Bearer``).
"""

from __future__ import annotations

import errno
import hmac
import socket
from collections.abc import Callable, Iterable
from typing import Any

import ujson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from greentask.daemon import scoreboard
from greentask.daemon.control import ControlError
from greentask.daemon.oneshot import OneShotServer

#: What a scrape sees: (totals per scoreboard field, per-worker rows, master facts).
Snapshot = Callable[[], tuple[list[float], list[dict[str, Any]], dict[str, Any]]]

#: Answers a control command (the master's ``handle_command``).
Command = Callable[[dict[str, Any]], dict[str, Any]]

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
            for outcome, count in zip(OUTCOME_LABELS, counts[:len(OUTCOME_LABELS)], strict=True):
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
    """``GET /metrics`` in Prometheus's text format, ``GET /status`` and ``POST /cancel``,
    from the master's loop."""

    def __init__(self, address: tuple[str, int], snapshot: Snapshot, command: Command,
                 token: str | None = None) -> None:
        self.command = command
        self.token = None if token is None else token.encode()
        self.registry = CollectorRegistry()
        self.registry.register(DaemonCollector(snapshot))
        super().__init__(self._bind(address))

    @staticmethod
    def _bind(address: tuple[str, int]) -> socket.socket:
        sock = socket.create_server(address, backlog=16) if address[1] else None
        if sock is None:
            raise OSError(errno.EINVAL, "metrics_bind needs a port")
        return sock

    def request_end(self, buffer: bytearray) -> int | None:
        """Where the HTTP request in ``buffer`` ends: after its head and its body."""
        head_end = buffer.find(b"\r\n\r\n")
        if head_end < 0:
            line_end = buffer.find(b"\n")
            if line_end >= 0 and b" HTTP/" not in buffer[:line_end]:
                return line_end + 1  # a bare request line, as from netcat
            return None
        end = head_end + 4 + _content_length(bytes(buffer[:head_end]))
        return end if len(buffer) >= end else None

    def respond(self, request: bytes) -> bytes:
        """An HTTP/1.0 response: GET /metrics, GET /status (JSON) or POST /cancel (JSON)."""
        head, _, body = request.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        parts = lines[0].split()
        method = parts[0] if parts else b""
        path = parts[1].split(b"?")[0] if len(parts) >= 2 else b""
        if method == b"GET" and path == b"/metrics":
            return _response("200 OK", "text/plain; version=0.0.4; charset=utf-8",
                             generate_latest(self.registry))
        if method == b"GET" and path == b"/status":
            return _json_response("200 OK", self.command({"command": "status"}))
        if method == b"POST" and path == b"/cancel":
            return self._cancel(_headers(lines[1:]).get(b"authorization", b""), body)
        return _response("404 Not Found", "text/plain; charset=utf-8",
                         b"GET /metrics, GET /status and POST /cancel are served here\n")

    def _cancel(self, authorization: bytes, body: bytes) -> bytes:
        if self.token is not None and not hmac.compare_digest(authorization,
                                                              b"Bearer " + self.token):
            return _json_response("401 Unauthorized", {
                "ok": False, "error": "send the task port's token: Authorization: Bearer TOKEN"})
        try:
            task = ujson.loads(body)
            if not isinstance(task, dict):
                raise ValueError
            reply = self.command({"command": "cancel", "pid": task.get("pid"),
                                  "key": task.get("key")})
        except ValueError:
            return _json_response("400 Bad Request", {
                "ok": False, "error": 'send a JSON object: {"pid": PID, "key": KEY}'})
        except ControlError as exc:
            return _json_response("400 Bad Request", {"ok": False, "error": str(exc)})
        return _json_response("202 Accepted", {"ok": True, **reply})


def _headers(lines: list[bytes]) -> dict[bytes, bytes]:
    found = {}
    for line in lines:
        name, _, value = line.partition(b":")
        found[name.strip().lower()] = value.strip()
    return found


def _content_length(head: bytes) -> int:
    try:
        return max(0, int(_headers(head.split(b"\r\n")[1:]).get(b"content-length", b"0")))
    except ValueError:
        return 0


def _json_response(status: str, document: dict[str, Any]) -> bytes:
    return _response(status, "application/json", ujson.dumps(document).encode() + b"\n")


def _response(status: str, content_type: str, body: bytes) -> bytes:
    return (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body
