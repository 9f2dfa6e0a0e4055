"""Cancelling a running task with a cancel line, on a real daemon over real sockets."""

from __future__ import annotations

import pytest

from .conftest import wait_until

pytestmark = pytest.mark.timeout(90)


def status_counts(daemon) -> tuple[int, int]:
    workers = daemon.status()["workers"]
    return sum(w["inflight"] for w in workers), sum(w["cancelled"] for w in workers)


def test_a_cancelled_task_ends_with_a_cancelled_error_and_is_counted_as_such(daemon,
                                                                               connect):
    conn = connect(daemon.port)
    conn.send_json({"function": "sleep", "args": [60], "id": "slow"})
    wait_until(lambda: daemon.inflight() == 1, 10, "the task to run")
    conn.send_json({"cancel": "slow"})
    reply = conn.read_json()
    assert reply == {"ok": False, "id": "slow", "error": {
        "type": "Cancelled", "message": "the task was cancelled by its caller"}}
    assert status_counts(daemon) == (0, 1)  # cancelled, not failed
    assert sum(w["failed"] for w in daemon.status()["workers"]) == 0
    assert conn.call({"function": "echo", "args": [1], "id": 2})["result"] == [1]


def test_a_task_may_clean_up_and_report_what_it_did(daemon, connect):
    conn = connect(daemon.port)
    conn.send_json({"function": "cleans_up", "args": [60], "id": 1})
    wait_until(lambda: daemon.inflight() == 1, 10, "the task to run")
    conn.send_json({"cancel": 1})
    error = conn.read_json()["error"]
    assert error["type"] == "Cancelled" and error["result"]["cleaned"] is True
    conn.send_json({"function": "returns_when_cancelled", "args": [60], "id": 2})
    wait_until(lambda: daemon.inflight() == 1, 10, "the task to run")
    conn.send_json({"cancel": 2})
    assert conn.read_json()["error"] == {"type": "Cancelled", "result": "stopped early",
                                         "message": "the task was cancelled by its caller"}


def test_a_task_that_ignores_the_cancel_is_stopped_after_cancel_grace(make_daemon, connect):
    daemon = make_daemon(processes=1, cancel_grace=0.5)
    conn = connect(daemon.port)
    conn.send_json({"function": "ignores_cancel", "args": [60], "id": "stubborn"})
    wait_until(lambda: daemon.inflight() == 1, 10, "the task to run")
    conn.send_json({"cancel": "stubborn"})
    error = conn.read_json()["error"]
    assert error["type"] == "Cancelled"
    assert "did not end within 0.5 s ([worker] cancel_grace), so it was stopped" in \
        error["message"]
    assert status_counts(daemon) == (0, 1)


def test_cancelling_an_unknown_or_finished_id_is_answered_with_nothing(daemon, connect):
    conn = connect(daemon.port)
    assert conn.call({"function": "echo", "args": [1], "id": 1})["ok"]
    conn.send_json({"cancel": 1})  # finished: its reply has gone
    conn.send_json({"cancel": "never-sent"})
    # The next line read is the echo's: the cancels got no reply.
    assert conn.call({"function": "echo", "args": [2], "id": 3}) == {
        "ok": True, "id": 3, "result": [2]}


@pytest.mark.parametrize("line, words", [
    ({"cancel": [1]}, '"cancel" must be the id'),
    ({"cancel": True}, '"cancel" must be the id'),
    ({"cancel": 1, "id": 2}, 'a cancel line has one field, "cancel"'),
])
def test_a_bad_cancel_line_is_a_bad_request(daemon, connect, line, words):
    reply = connect(daemon.port).call(line)
    assert reply["error"]["type"] == "BadRequest" and words in reply["error"]["message"]


def test_cancel_on_disconnect_cancels_only_the_tasks_that_asked(daemon, connect):
    conn = connect(daemon.port)
    conn.send_json({"function": "sleep", "args": [60], "id": 1, "cancel_on_disconnect": True})
    conn.send_json({"function": "sleep", "args": [0.5], "id": 2})
    wait_until(lambda: daemon.inflight() == 2, 10, "both tasks to run")
    conn.close()
    # The 60 s task is cancelled; the other finishes (its reply is dropped).
    wait_until(lambda: status_counts(daemon) == (0, 1), 10, "the cancel on disconnect")
    assert sum(w["done"] for w in daemon.status()["workers"]) == 1


def test_cancels_racing_completion_leave_every_request_exactly_one_reply(daemon, connect):
    conn = connect(daemon.port)
    for i in range(1000):
        conn.send_json({"function": "sleep", "args": [0.001 * (i % 3)], "id": i})
        conn.send_json({"cancel": i})
    finals: dict[int, str] = {}
    while len(finals) < 1000:
        reply = conn.read_json()
        assert reply["id"] not in finals, reply  # one final reply per request
        finals[reply["id"]] = "ok" if reply["ok"] else reply["error"]["type"]
    assert set(finals.values()) <= {"ok", "Cancelled"}
    assert conn.call({"function": "echo", "args": ["after"], "id": "last"})["id"] == "last"
    assert status_counts(daemon)[0] == 0


def test_a_task_handle_cancels_its_task_and_get_raises_cancelled(daemon):
    from greentask import Cancelled, TaskClient
    with TaskClient([daemon.address], timeout=60) as client:
        handle = client.submit("sleep", 60)
        wait_until(lambda: daemon.inflight() == 1, 10, "the task to run")
        handle.cancel()
        with pytest.raises(Cancelled, match="cancelled by its caller"):
            handle.get(timeout=20)
        reported = client.submit("cleans_up", 60)
        wait_until(lambda: daemon.inflight() == 1, 10, "the task to run")
        reported.cancel()
        with pytest.raises(Cancelled) as info:
            reported.get(timeout=20)
        assert info.value.result["cleaned"] is True
        finished = client.submit("echo", 1)
        assert finished.get() == [1]
        finished.cancel()  # done already: nothing happens
        assert finished.get() == [1]
        assert client.call("echo", "still fine") == ["still fine"]
    assert daemon.inflight() == 0


def test_a_cancelled_send_bulk_reports_exactly_what_the_smtp_server_received(make_daemon):
    from aiosmtpd.controller import Controller

    from greentask import Cancelled, TaskClient

    from .conftest import free_port
    from .smtp_sink import Inbox
    inbox = Inbox(delay=0.02)  # a slow mail server: the 1,000 would take seconds
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        daemon = make_daemon(processes=1, cancel_grace=5,
                             smtp={"port": controller.port, "max_parallel": 4})
        recipients = [f"u{i}@example.org" for i in range(1000)]
        first_progress = []
        with TaskClient([daemon.address], timeout=120) as client:
            handle = client.submit("send_bulk", recipients, "s", "b",
                                   on_progress=first_progress.append)
            wait_until(lambda: first_progress, 30, "the first progress line")
            handle.cancel()
            with pytest.raises(Cancelled, match="cancelled after") as info:
                handle.get(timeout=30)
        result = info.value.result
        assert result["total"] == 1000 and 0 < result["sent"] < 1000
        delivered = inbox.recipients()
        assert len(delivered) == len(set(delivered)) == result["sent"]  # each exactly once
        wait_until(lambda: daemon.inflight() == 0, 10, "nothing in flight")
    finally:
        controller.stop()


def test_ctrl_c_in_greentask_call_cancels_the_task_and_prints_its_partial_result(daemon):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from .conftest import ROOT
    # SIGINT at its default, as in a terminal: a process started in the
    # background of a shell without job control inherits it ignored, and
    # Python then never raises KeyboardInterrupt.
    call = subprocess.Popen([str(Path(sys.executable).with_name("greentask")), "call",
                             "cleans_up", "[60]", "--server", daemon.address], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_until(lambda: daemon.inflight() == 1, 20, "the task to run")
        call.send_signal(signal.SIGINT)
        out, err = call.communicate(timeout=60)
    finally:
        if call.poll() is None:
            call.kill()
    assert call.returncode == 130, err
    assert "cancelling the task" in err and "cancelled: " in err
    assert '"cleaned":true' in out
    wait_until(lambda: daemon.inflight() == 0, 10, "nothing in flight")


def test_a_browser_cancels_its_task_and_gets_a_cancelled_event(daemon, make_gateway):
    import json
    ws = make_gateway(daemon, expose="sleep, cleans_up").connect()
    ws.send(json.dumps({"function": "cleans_up", "args": [60], "id": "abc"}))
    wait_until(lambda: daemon.inflight() == 1, 20, "the task to run")
    ws.send(json.dumps({"cancel": "abc"}))
    event = json.loads(ws.recv())
    assert event["id"] == "abc" and event["event"] == "cancelled"
    assert event["result"]["cleaned"] is True
    ws.send(json.dumps({"cancel": "unknown"}))  # nothing to cancel: no answer
    ws.send(json.dumps({"function": "sleep", "args": [0], "id": "next"}))
    assert json.loads(ws.recv())["id"] == "next"


def test_a_closed_browser_socket_cancels_its_tasks_when_the_gateway_says_so(daemon,
                                                                            make_gateway):
    import json
    ws = make_gateway(daemon, cancel_on_disconnect="true").connect()
    ws.send(json.dumps({"function": "sleep", "args": [60], "id": 1}))
    wait_until(lambda: daemon.inflight() == 1, 20, "the task to run")
    ws.close()
    wait_until(lambda: daemon.inflight() == 0, 20, "the task to be cancelled")
    assert status_counts(daemon) == (0, 1)


def test_progress_is_a_cancel_point_in_a_loop_that_never_yields(daemon, connect):
    conn = connect(daemon.port)
    conn.send_json({"function": "busy_with_progress", "args": [10 ** 7], "id": 1})
    wait_until(lambda: daemon.inflight() == 1, 20, "the task to run")
    conn.send_json({"cancel": 1})
    assert conn.read_json()["error"]["type"] == "Cancelled"
    assert status_counts(daemon) == (0, 1)


def test_a_call_that_times_out_on_the_client_cancels_the_task_on_the_server(daemon):
    from greentask import TaskClient, TaskTimeout
    with TaskClient([daemon.address]) as client:
        with pytest.raises(TaskTimeout, match="no reply to task 'outlives_its_timeout'"):
            client.call("outlives_its_timeout", 60, timeout=0.5)
    wait_until(lambda: status_counts(daemon) == (0, 1), 20, "the task to be cancelled")
