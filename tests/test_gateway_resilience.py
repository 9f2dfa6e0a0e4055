"""The gateway under faults: task servers restarting under load, a thousand
browsers vanishing, and the /metrics that shows it."""

from __future__ import annotations

import json
import resource
import signal
import socket
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import wait_until
from .ws_peer import TEXT, Peer

pytestmark = pytest.mark.timeout(120)


def scrape(gateway) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def messages(metrics: dict, outcome: str) -> float:
    return metrics.get(("greentask_gateway_messages_total", (("outcome", outcome),)), 0)


def test_metrics_sum_every_gunicorn_worker(daemon, make_gateway):
    gateway = make_gateway(daemon, use_conf_file=True, workers=2)
    sockets = [gateway.connect() for _ in range(10)]
    for i, ws in enumerate(sockets):
        ws.send(json.dumps({"function": "echo", "args": [i], "id": i}))
        ws.send(json.dumps({"function": "echo", "args": [i], "id": i + 100}))
    sockets[0].send(json.dumps({"function": "pid", "id": 1}))  # not in expose
    sockets[1].send("{broken")
    for ws in sockets:
        finals = 3 if ws in sockets[:2] else 2
        for _ in range(finals):
            json.loads(ws.recv())
    for ws in sockets[:4]:
        ws.close()
    expected = {("complete",): 20, ("NotExposed",): 1, ("BadRequest",): 1}

    def settled():
        # Workers add their message counts to the shared files once a second.
        metrics = scrape(gateway)
        counts = {(o,): messages(metrics, o) for (o,) in expected}
        return metrics if metrics[("greentask_gateway_sockets", ())] == 6 and \
            counts == expected else None
    wait_until(settled, 10, "every worker's counts to be shared")
    # Each scrape reaches one of the two workers; every one must show both.
    for _ in range(8):
        metrics = scrape(gateway)
        assert {(o,): messages(metrics, o) for (o,) in expected} == expected
        assert metrics[("greentask_gateway_sockets", ())] == 6
        assert metrics[("greentask_gateway_sockets_opened_total", ())] == 10


def test_keeps_serving_while_the_task_servers_reload_and_restart(make_daemon, make_gateway):
    daemon = make_daemon()
    gateway = make_gateway(daemon)
    finals: list[dict] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def browser(n: int) -> None:
        try:
            ws = gateway.connect()
            i = 0
            while not stop.is_set():
                i += 1
                ws.send(json.dumps({"function": "echo", "args": [n, i], "id": i}))
                event = json.loads(ws.recv())
                assert event["id"] == i
                finals.append(event)
            ws.close()
        except BaseException as exc:
            errors.append(exc)

    def more_finals(count: int, what: str) -> None:
        # Phases end on progress, not on time: a loaded machine serves fewer
        # messages per second, never none.
        target = len(finals) + count
        wait_until(lambda: len(finals) >= target or errors, 60, what)
        assert not errors, errors[:3]

    threads = [threading.Thread(target=browser, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    more_finals(50, "the browsers to be served")
    for _ in range(2):  # reloads lose nothing
        old = set(daemon.children())
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_children(2, 30, exclude=old)
        more_finals(50, "messages served by the reloaded workers")
    during_reloads = len(finals)
    assert all(event["event"] == "complete" for event in finals[:during_reloads])
    daemon.signal(signal.SIGTERM)  # a full restart: calls fail, each with an error event
    assert daemon.wait(15) == 0
    more_finals(20, "error events while no task server runs")
    daemon.start()
    restarted = len(finals)
    wait_until(lambda: any(event["event"] == "complete" for event in finals[restarted:]),
               30, "a message served again after the restart")
    stop.set()
    for thread in threads:
        thread.join(30)
    assert not errors, errors[:3]
    kinds = {event["event"] if event["event"] == "complete" else event["error"]["type"]
             for event in finals}
    assert kinds <= {"complete", "ConnectionFailed", "WorkerLost"}, kinds
    assert gateway.proc.poll() is None
    print(f"gateway under restarts: {len(finals)} messages, {during_reloads} during 2 reloads "
          f"(all complete); kinds: {sorted(kinds)}")


def test_a_thousand_browsers_vanish_without_a_close_frame(daemon, make_gateway, tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    gateway = make_gateway(daemon, max_inflight=1100,  # every vanished tab's task runs
                           expose="echo, until_exists")
    release = tmp_path / "release"
    vanished = []
    for i in range(1000):
        ws = gateway.connect()
        # Every task runs until the file exists: still running when its browser vanishes.
        ws.send(json.dumps({"function": "until_exists", "args": [str(release)], "id": i}))
        vanished.append(ws)
    for ws in vanished:
        ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        ws.sock.close()  # a reset, no close frame: a crashed tab or a lost network
    release.touch()
    survivor = gateway.connect()
    survivor.send(json.dumps({"function": "echo", "args": ["still here"], "id": 1}))
    assert json.loads(survivor.recv())["result"] == ["still here"]

    def drained():
        metrics = scrape(gateway)
        return metrics if metrics[("greentask_gateway_sockets", ())] == 1 and \
            messages(metrics, "complete") >= 1001 else None
    metrics = wait_until(drained, 30, "the vanished sockets' tasks to finish")
    assert metrics[("greentask_gateway_results_dropped_total", ())] == 1000
    assert metrics[("greentask_gateway_sockets_opened_total", ())] == 1001
    assert gateway.proc.poll() is None
    assert "Traceback" not in gateway.log()
    survivor.send(json.dumps({"function": "echo", "args": ["after"], "id": 2}))
    assert json.loads(survivor.recv())["result"] == ["after"]


def test_a_browser_that_reads_nothing_holds_up_no_one_else(daemon, make_gateway):
    # The task connections are shared: a reply for a browser whose socket is
    # full must wait in that socket's outbox, not in the task connection's
    # reader, or every other browser's replies would wait behind it.
    gateway = make_gateway(daemon, allow_no_origin="true",
                           expose="echo, floods_progress")
    stalled = Peer(gateway.port, receive_buffer=4096)
    stalled.send(TEXT, json.dumps({"function": "floods_progress", "args": [200, 100_000],
                                   "id": "flood"}).encode())
    before = scrape(gateway).get(("greentask_gateway_results_dropped_total", ()), 0)
    other = gateway.connect()
    for i in range(40):  # both task connections, while 20 MB of progress pile up
        other.send(json.dumps({"function": "echo", "args": [i], "id": i}))
        assert json.loads(other.recv())["result"] == [i]
    # Past the outbox's high-water mark the stalled socket's progress is
    # dropped, and counted; its final event never is.
    wait_until(lambda: scrape(gateway).get(("greentask_gateway_results_dropped_total", ()),
                                           0) > before, 30, "progress to be dropped")
    stalled.sock.settimeout(30)
    while True:
        event = json.loads(stalled.message())
        if event["event"] != "progress":
            break
    assert (event["id"], event["event"], event["result"]) == ("flood", "complete", 200)
    other.close()
    stalled.close()
