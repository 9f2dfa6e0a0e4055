"""greentask/examples/fastapi_app.py under real uvicorn, driven by real HTTP clients (httpx)."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys

import httpx
import pytest
from aiosmtpd.controller import Controller

from .conftest import ROOT, free_port, port_open, wait_until
from .smtp_sink import Inbox

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def inbox():
    inbox = Inbox(delay=0.005)
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield inbox, controller.port
    controller.stop()


@pytest.fixture
def app_url(make_daemon, inbox, tmp_path):
    """uvicorn serving the example app against a daemon that mails the inbox."""
    daemon = make_daemon(smtp={"port": inbox[1], "max_parallel": 10})
    port = free_port()
    log = open(tmp_path / "uvicorn.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "greentask.examples.fastapi_app:app",
         "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "GREENTASK_SERVERS": daemon.address})
    log.close()
    try:
        wait_until(lambda: port_open(port) or server.poll() is not None, 30, "uvicorn to listen")
        assert server.poll() is None, (tmp_path / "uvicorn.log").read_text()
        yield f"http://127.0.0.1:{port}", daemon
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


def read_events(response: httpx.Response) -> list[tuple[str, object]]:
    """Server-Sent Events as (event, data) pairs, until the stream ends."""
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            events.append((name, json.loads(line.removeprefix("data: "))))
    return events


def test_a_bulk_job_starts_at_once_streams_its_progress_and_delivers(app_url, inbox):
    url, _ = app_url
    recipients = [f"user{i}@example.org" for i in range(200)]
    with httpx.Client(base_url=url, timeout=60) as http:
        started = http.post("/bulk", json={"recipients": recipients, "subject": "Hi"})
        assert started.status_code == 202
        job = started.json()["id"]
        with http.stream("GET", f"/bulk/{job}/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = read_events(response)
        assert http.get("/bulk/nonexistent/events").status_code == 404
        assert http.post("/bulk", json={"recipients": []}).status_code == 422
    progress = [data for name, data in events if name == "progress"]
    assert [p["done"] for p in progress] == list(range(1, 201))
    assert events[-1] == ("done", {"sent": 200, "total": 200, "failed": {}})
    delivered = collections.Counter(inbox[0].recipients())
    assert delivered == collections.Counter(recipients)


def test_a_bulk_job_is_cancelled_by_delete_and_says_what_it_sent(app_url, inbox):
    url, daemon = app_url
    inbox[0].delay = 0.05  # slow enough to cancel midway
    recipients = [f"late{i}@example.org" for i in range(2000)]
    with httpx.Client(base_url=url, timeout=60) as http:
        job = http.post("/bulk", json={"recipients": recipients}).json()["id"]
        with http.stream("GET", f"/bulk/{job}/events") as response:
            events = []
            for line in response.iter_lines():
                if line.startswith("event: progress") and not events:
                    events.append("progress")
                    assert http.delete(f"/bulk/{job}").json() == {"cancelling": True}
                elif line.startswith("data: ") and events:
                    events.append(json.loads(line.removeprefix("data: ")))
        failed = events[-1]
        assert failed["type"] == "Cancelled", failed
        assert http.delete(f"/bulk/{job}").json() == {"cancelling": False}
    sent = len(inbox[0].recipients())
    assert 0 < sent < len(recipients)
    assert failed["result"]["sent"] == sent
    wait_until(lambda: sum(w["inflight"] for w in daemon.status()["workers"]) == 0, 10,
               "the cancelled job to end")
