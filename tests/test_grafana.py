"""conf/grafana-dashboard.json queries only metrics that the daemon and the gateway serve."""

from __future__ import annotations

import json
import re

import pytest

from greentask import TaskClient

from .conftest import ROOT, free_port, wait_until
from .test_control import scrape

pytestmark = pytest.mark.timeout(60)

DASHBOARD = ROOT / "conf" / "grafana-dashboard.json"
#: A metric name in PromQL: greentask_ and what may follow, up to a ( { [ or space.
METRIC = re.compile(r"\bgreentask_[a-z_]+\b")


def test_every_metric_the_dashboard_queries_is_served(make_daemon, make_gateway):
    dashboard = json.loads(DASHBOARD.read_text())
    queried = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in METRIC.findall(target["expr"])}
    assert len(queried) >= 12
    port = free_port()
    daemon = make_daemon(metrics_bind=f"127.0.0.1:{port}")
    gateway = make_gateway(daemon)
    with TaskClient([daemon.address]) as client:
        client.call("echo", 1)
    socket = gateway.connect()
    socket.send("hello")
    assert socket.recv() == "task complete"
    socket.close()
    def gateway_names() -> set[str] | None:
        names = {name for name, _ in scrape(gateway.port)}
        return names if "greentask_gateway_messages_total" in names else None

    served = {name for name, _ in scrape(port)}
    served |= wait_until(gateway_names, 10, "the gateway to count the message")
    assert queried <= served, sorted(queried - served)
    # Each panel says what it shows, and all read the one Prometheus variable.
    assert all(panel["title"] for panel in dashboard["panels"])
    assert {target["datasource"]["uid"] for panel in dashboard["panels"]
            for target in panel["targets"]} == {"${datasource}"}
