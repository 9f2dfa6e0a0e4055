"""The WebSocket gateway under real gunicorn, against a real task daemon."""

from __future__ import annotations

import json
import signal
import socket
import struct
import threading

import pytest
import websocket

from .conftest import Gateway, free_port, wait_until

pytestmark = pytest.mark.timeout(90)

def close_code(ws: websocket.WebSocket) -> int:
    """Read until the server's close frame; return its code."""
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return struct.unpack("!H", data[:2])[0]


def test_500_messages_on_10_sockets_each_get_their_final_event(daemon, make_gateway):
    gateway = make_gateway(daemon, max_inflight_per_socket=50, max_inflight=500)
    results: dict[int, list[dict]] = {}

    def client(n: int) -> None:
        ws = gateway.connect()
        for i in range(50):
            ws.send(json.dumps({"function": "echo", "args": {"n": n, "i": i},
                                "id": f"{n}-{i}"}))
        results[n] = [json.loads(ws.recv()) for _ in range(50)]
        ws.close()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    events = [event for n in range(10) for event in results[n]]
    assert len(events) == 500
    for event in events:
        n, i = map(int, event["id"].split("-"))
        assert event["event"] == "complete" and event["message"] == "task complete"
        assert event["result"] == {"n": n, "i": i}
    assert len({event["id"] for event in events}) == 500


def test_plain_text_message_gets_plain_task_complete(daemon, make_gateway):
    ws = make_gateway(daemon).connect()
    ws.send("send a mail to 1000 users")
    assert ws.recv() == "task complete"


def test_progress_events_arrive_in_order_before_complete(make_daemon, make_gateway):
    from aiosmtpd.controller import Controller
    from aiosmtpd.handlers import Sink
    controller = Controller(Sink(), hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        daemon = make_daemon(smtp={"port": controller.port})
        ws = make_gateway(daemon).connect()
        recipients = [f"u{i}@example.org" for i in range(50)]
        ws.send(json.dumps({"function": "send_bulk", "id": "b", "args": {
            "recipients": recipients, "subject": "s", "body": "b"}}))
        events = [json.loads(ws.recv()) for _ in range(51)]
    finally:
        controller.stop()
    assert [e["progress"]["done"] for e in events[:50]] == list(range(1, 51))
    assert events[50]["event"] == "complete"
    assert events[50]["result"]["sent"] == 50


def test_broken_json_gets_bad_request(daemon, make_gateway):
    ws = make_gateway(daemon).connect()
    ws.send('{"function": "echo", "args": [1]')
    event = json.loads(ws.recv())
    assert event["error"]["type"] == "BadRequest" and "not valid JSON" in event["error"]["message"]


def test_frame_announcing_2_to_the_62_bytes_closes_with_1009_without_reading(daemon,
                                                                            make_gateway):
    ws = make_gateway(daemon).connect()
    ws.sock.sendall(b"\x81\xff" + struct.pack("!Q", 2 ** 62) + b"\x00\x00\x00\x00")
    assert close_code(ws) == 1009


@pytest.mark.parametrize("message, kind", [
    ({"function": "cpu", "args": [1], "id": 1}, "NotExposed"),
    ({"function": "sleep", "args": 5, "id": 2}, "BadRequest"),
    ({"function": "sleep", "args": {"nope": 1}, "id": 3}, "BadArguments"),
])
def test_refused_messages_get_error_events_and_the_socket_keeps_serving(
        daemon, make_gateway, message, kind):
    ws = make_gateway(daemon).connect()
    ws.send(json.dumps(message))
    event = json.loads(ws.recv())
    assert event["event"] == "error" and event["error"]["type"] == kind
    assert event["id"] == message["id"]
    ws.send(json.dumps({"function": "echo", "args": [1], "id": "next"}))
    assert json.loads(ws.recv())["event"] == "complete"


def test_task_errors_do_not_leak_details(daemon, make_gateway):
    gateway = make_gateway(daemon, expose="fail, cpu")
    ws = gateway.connect()
    ws.send(json.dumps({"function": "fail", "args": ["secret path /etc/x"], "id": 1}))
    event = json.loads(ws.recv())
    assert event["error"] == {"type": "TaskError", "message": "the task failed"}
    # The operator's detail is in the gateway's log, in gunicorn's format.
    wait_until(lambda: "task 'fail' for a browser at 127.0.0.1: TaskError: RuntimeError: "
               "secret path /etc/x" in gateway.log(), 10, "the failure in the log")
    assert "[WARNING] task 'fail'" in gateway.log()


def test_not_exposed_names_the_setting_and_the_log_says_how_to_allow_it(daemon,
                                                                          make_gateway):
    gateway = make_gateway(daemon, expose="echo")
    ws = gateway.connect()
    ws.send(json.dumps({"function": "cpu", "args": [1], "id": 1}))
    assert json.loads(ws.recv())["error"] == {
        "type": "NotExposed",
        "message": "'cpu' cannot be called from a browser (it is not in [gateway] expose); "
                   "callable: echo"}
    wait_until(lambda: "asked for 'cpu', which [gateway] expose does not list (echo); to "
               "allow it, add it there and restart the gateway" in gateway.log(), 10,
               "the log line")


def test_the_gateway_answers_favicon(daemon, make_gateway):
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{make_gateway(daemon).port}/favicon.ico",
                                timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/svg+xml"
        assert response.read().startswith(b"<svg")


def test_too_many_in_flight_get_overloaded(daemon, make_gateway):
    ws = make_gateway(daemon, max_inflight_per_socket=2).connect()
    for i in range(4):
        ws.send(json.dumps({"function": "sleep", "args": [0.5], "id": i}))
    events = [json.loads(ws.recv()) for _ in range(4)]
    kinds = sorted(e["event"] if e["event"] == "complete" else e["error"]["type"]
                   for e in events)
    assert kinds == ["Overloaded", "Overloaded", "complete", "complete"]


def test_oversize_message_closes_with_1009_and_others_keep_working(daemon, make_gateway):
    gateway = make_gateway(daemon, max_message="1KiB")
    other = gateway.connect()
    ws = gateway.connect()
    ws.send("x" * 5000)
    assert close_code(ws) == 1009
    other.send(json.dumps({"function": "echo", "args": [1], "id": 1}))
    assert json.loads(other.recv())["event"] == "complete"


def test_invalid_utf8_closes_with_1007(daemon, make_gateway):
    ws = make_gateway(daemon).connect()
    ws.send(b"\xff\xfe", opcode=websocket.ABNF.OPCODE_TEXT)
    assert close_code(ws) == 1007


def test_fragmented_message_and_ping(daemon, make_gateway):
    ws = make_gateway(daemon).connect()
    ws.ping(b"hi")
    opcode, data = ws.recv_data(control_frame=True)
    assert (opcode, data) == (websocket.ABNF.OPCODE_PONG, b"hi")
    text = json.dumps({"function": "echo", "args": ["frag"], "id": 9})
    ws.send_frame(websocket.ABNF.create_frame(text[:10], websocket.ABNF.OPCODE_TEXT, fin=0))
    ws.send_frame(websocket.ABNF.create_frame(text[10:], websocket.ABNF.OPCODE_CONT, fin=1))
    assert json.loads(ws.recv())["result"] == ["frag"]


def test_server_close_code_reaches_the_client(daemon, make_gateway):
    ws = make_gateway(daemon, idle_timeout=0.5).connect()
    assert close_code(ws) == 1000  # idle timeout


def refused_status(gateway: Gateway, **options: object) -> int | None:
    """The HTTP status of a refused handshake, or None when the socket opened."""
    try:
        gateway.connect(**options).close()
    except websocket.WebSocketBadStatusException as exc:
        return exc.status_code
    return None


def test_only_listed_origins_open_the_socket(daemon, make_gateway):
    gateway = make_gateway(daemon)
    own = f"http://127.0.0.1:{gateway.port}"
    assert refused_status(gateway, origin=own) is None
    assert refused_status(gateway, origin=own.upper() + "/") is None  # as browsers may
    assert refused_status(gateway, origin="http://evil.example") == 403
    # The scheme counts: an https page of the same host is another origin.
    assert refused_status(gateway, origin=f"https://127.0.0.1:{gateway.port}") == 403
    # DNS rebinding: Host and Origin agree, but neither is the configured origin.
    assert refused_status(gateway, origin="http://evil.example", host="evil.example") == 403
    assert refused_status(gateway, origin="null") == 403
    allowed = make_gateway(daemon, allowed_origins="https://app.example")
    assert refused_status(allowed, origin="https://app.example:443") is None
    assert "not allowed: add it to [gateway] allowed_origins" in gateway.log()


def test_a_handshake_without_origin_is_refused_unless_allowed(daemon, make_gateway):
    gateway = make_gateway(daemon)
    assert refused_status(gateway, suppress_origin=True) == 403
    programs = make_gateway(daemon, allow_no_origin="true")
    ws = programs.connect(suppress_origin=True)
    ws.send(json.dumps({"function": "echo", "args": [1], "id": 1}))
    assert json.loads(ws.recv())["event"] == "complete"
    ws.close()


def test_the_authorize_hook_admits_only_the_applications_users(daemon, make_gateway):
    gateway = make_gateway(daemon, authorize="tests.gateway_auth:authorize")
    assert refused_status(gateway) == 401
    assert refused_status(gateway, cookie="sessionid=made-up") == 401
    assert refused_status(gateway, cookie="sessionid=banned-session") == 403
    ws = gateway.connect(cookie="sessionid=good-session")
    ws.send(json.dumps({"function": "echo", "args": ["hi"], "id": 1}))
    assert json.loads(ws.recv())["result"] == ["hi"]
    ws.close()
    broken = make_gateway(daemon, authorize="tests.gateway_auth:broken")
    assert refused_status(broken) == 500
    wait_until(lambda: "the session store is down" in broken.log(), 10, "the traceback")


def test_the_default_authorize_admits_only_local_peers():
    from greentask.gateway.admission import Refuse, loopback_only
    assert loopback_only({"REMOTE_ADDR": "127.0.0.1"}) == "local 127.0.0.1"
    assert loopback_only({"REMOTE_ADDR": "::1"}) == "local ::1"
    for outside in ("192.0.2.7", "2001:db8::1", "", "not-an-address"):
        with pytest.raises(Refuse) as info:
            loopback_only({"REMOTE_ADDR": outside})
        assert info.value.status == 403


def test_a_gateway_process_runs_at_most_max_inflight_tasks_over_all_sockets(
        daemon, make_gateway):
    gateway = make_gateway(daemon, max_inflight=2)
    first, second = gateway.connect(), gateway.connect()
    for i in range(2):
        first.send(json.dumps({"function": "sleep", "args": [5], "id": i}))
    # Running on the task server means the gateway holds both permits.
    wait_until(lambda: daemon.inflight() == 2, 10, "both sleeps running")
    second.send(json.dumps({"function": "echo", "args": [1], "id": "late"}))
    refused = json.loads(second.recv())
    assert refused["id"] == "late" and refused["error"]["type"] == "Overloaded"
    assert [json.loads(first.recv())["event"] for _ in range(2)] == ["complete"] * 2
    second.send(json.dumps({"function": "echo", "args": [1], "id": "again"}))
    assert json.loads(second.recv())["event"] == "complete"  # the permits came back


def test_task_server_down_then_back(make_daemon, make_gateway):
    daemon = make_daemon(start=False)
    gateway = make_gateway(None, task_servers=daemon.address)
    ws = gateway.connect()
    ws.send(json.dumps({"function": "echo", "args": [1], "id": 1}))
    event = json.loads(ws.recv())
    assert event["error"] == {"type": "ConnectionFailed", "message": "the task servers cannot "
                              "be reached right now; try again later"}  # no operator advice
    wait_until(lambda: "scripts/run" in gateway.log(), 10, "the operator's detail in the log")
    assert gateway_health(gateway) == 503
    daemon.start()
    wait_until(lambda: gateway_health(gateway) == 200, 10, "healthz to recover")
    ws.send(json.dumps({"function": "echo", "args": [2], "id": 2}))
    assert json.loads(ws.recv())["result"] == [2]


def test_a_task_server_that_never_answers_gets_the_browser_a_timeout(make_gateway):
    # It accepts and reads, but neither answers nor closes: only the
    # gateway's own deadline (call_timeout + 1 s) can end the wait.
    listener = socket.create_server(("127.0.0.1", 0))
    silent: list[socket.socket] = []

    def accept_forever() -> None:
        while True:
            try:
                silent.append(listener.accept()[0])
            except OSError:
                return
    threading.Thread(target=accept_forever, daemon=True).start()
    gateway = make_gateway(None, task_servers=f"127.0.0.1:{listener.getsockname()[1]}",
                           call_timeout=1, max_inflight_per_socket=1)
    ws = gateway.connect()
    for i in range(2):  # the second is taken: the first one's permit came back
        ws.send(json.dumps({"function": "echo", "args": [i], "id": i}))
        event = json.loads(ws.recv())
        assert (event["id"], event["event"], event["error"]) == (i, "error", {
            "type": "Timeout", "message": "the task took too long and was stopped"})
    wait_until(lambda: "within 2 s" in gateway.log(), 10, "the operator's detail in the log")
    listener.close()
    for conn in silent:
        conn.close()


def gateway_health(gateway: Gateway) -> int:
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/healthz", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_demo_page_is_served(daemon, make_gateway):
    import urllib.request
    gateway = make_gateway(daemon)
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/", timeout=10) as page:
        body = page.read().decode()
    assert page.status == 200 and "send_bulk" in body and "/ws" in body


def test_unmasked_client_frame_fails_the_connection_with_1002(daemon, make_gateway):
    ws = make_gateway(daemon).connect()
    ws.sock.sendall(b"\x81\x05hello")  # a text frame without the mask bit
    assert close_code(ws) == 1002


def test_large_replies_from_many_greenlets_never_interleave(daemon, make_gateway):
    ws = make_gateway(daemon, max_message="256KiB", max_inflight_per_socket=40).connect()
    blob = "z" * 60000
    for i in range(40):
        ws.send(json.dumps({"function": "echo", "args": [blob, i], "id": i}))
    events = [json.loads(ws.recv()) for _ in range(40)]  # a torn frame would not parse
    assert sorted(e["result"][1] for e in events) == list(range(40))
    assert all(e["result"][0] == blob for e in events)


def test_shipped_gunicorn_conf_serves_and_logs_requests(daemon, make_gateway):
    gateway = make_gateway(daemon, use_conf_file=True)
    ws = gateway.connect()
    ws.send("hello")
    assert ws.recv() == "task complete"
    assert gateway_health(gateway) == 200
    wait_until(lambda: "GET /healthz" in gateway.log(), 5, "the access log line")
    assert '"GET /healthz HTTP/1.1" 200' in gateway.log()


def test_malformed_key_is_400(daemon, make_gateway):
    import http.client
    gateway = make_gateway(daemon)
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    conn.request("GET", "/ws", headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                        "Sec-WebSocket-Version": "13",
                                        "Origin": f"http://127.0.0.1:{gateway.port}",
                                        "Sec-WebSocket-Key": "not base64!!"})
    response = conn.getresponse()
    assert response.status == 400
    assert b"Sec-WebSocket-Key" in response.read()


def test_graceful_stop_tells_open_sockets_1001(daemon, make_gateway):
    gateway = make_gateway(daemon)
    ws = gateway.connect()
    ws.send(json.dumps({"function": "echo", "args": [1], "id": 1}))
    assert json.loads(ws.recv())["event"] == "complete"
    gateway.proc.send_signal(signal.SIGTERM)
    assert close_code(ws) == 1001
    assert gateway.proc.wait(10) == 0


def test_client_close_code_is_echoed(daemon, make_gateway):
    ws = make_gateway(daemon).connect()
    ws.send_close(4001, b"bye")
    assert close_code(ws) == 4001


def test_browser_that_vanishes_mid_task_does_not_hurt_the_gateway(daemon, make_gateway):
    gateway = make_gateway(daemon)
    for _ in range(20):
        ws = gateway.connect()
        ws.send(json.dumps({"function": "sleep", "args": [0.3], "id": 1}))
        ws.sock.close()  # no close frame, like a tab that crashed
    other = gateway.connect()
    other.send(json.dumps({"function": "sleep", "args": [0.5], "id": 2}))
    assert json.loads(other.recv())["event"] == "complete"
    assert gateway.proc.poll() is None
    assert "Traceback" not in gateway.log()


def test_pongs_never_land_inside_data_frames(daemon, make_gateway):
    ws = make_gateway(daemon, max_message="256KiB", max_inflight_per_socket=30).connect()
    blob = "p" * 50000
    for i in range(30):
        ws.send(json.dumps({"function": "echo", "args": [blob, i], "id": i}))
        ws.ping(str(i))
    texts, pongs = [], []
    while len(texts) < 30 or len(pongs) < 30:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_PONG:
            pongs.append(data.decode())
        else:
            texts.append(json.loads(data))  # a pong inside would break the JSON
    assert sorted(pongs, key=int) == [str(i) for i in range(30)]
    assert sorted(t["result"][1] for t in texts) == list(range(30))


@pytest.mark.parametrize("use_conf_file, status", [(True, 2), (False, 3)])
def test_a_wrong_gateway_setting_is_one_line_and_gunicorn_stops(use_conf_file, status):
    import os
    import subprocess

    from .conftest import GUNICORN, ROOT, WORKER_CLASS
    how = ["-c", "conf/gunicorn.conf.py"] if use_conf_file else ["-k", WORKER_CLASS]
    result = subprocess.run(
        [GUNICORN, *how, "-b", f"127.0.0.1:{free_port()}", "greentask.ws:app"], cwd=ROOT,
        env={**os.environ, "GREENTASK_GATEWAY_MAX_MESSAGE": "abc"}, capture_output=True,
        text=True, timeout=60)
    assert result.returncode == status  # 3: gunicorn's own "Worker failed to boot" stop
    ours = [line for line in result.stderr.splitlines() if "greentask gateway:" in line]
    assert ours == ["greentask gateway: environment variable GREENTASK_GATEWAY_MAX_MESSAGE="
                    "'abc' ([gateway] max_message): expected a positive size in bytes, such "
                    "as 1048576, 64KiB or 1MiB"]
    assert "Traceback" not in result.stderr


def test_a_hup_makes_the_gateway_read_expose_again(make_daemon, make_gateway, tmp_path):
    # What README's "Write a task" tells a user who exposes a new task.
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "mytasks.py").write_text("from greentask import task\n\n\n"
                                        "@task(name='report.build')\ndef build(month):\n"
                                        "    return {'month': month}\n")
    daemon = make_daemon(tasks="greentask.examples.basic, mytasks",
                         env={"PYTHONPATH": str(modules)})
    gateway = make_gateway(daemon, expose="echo")
    request = json.dumps({"function": "report.build", "args": ["2026-11"], "id": 1})
    ws = gateway.connect()
    ws.send(request)
    assert json.loads(ws.recv())["error"]["type"] == "NotExposed"
    ws.close()
    gateway.config.write_text(gateway.config.read_text().replace(
        "expose = echo", "expose = echo, report.build"))
    gateway.proc.send_signal(signal.SIGHUP)  # gunicorn starts fresh workers, which read it

    def exposed() -> bool:
        fresh = gateway.connect()
        try:
            fresh.send(request)
            return json.loads(fresh.recv())["event"] == "complete"
        finally:
            fresh.close()
    wait_until(exposed, 30, f"report.build to be exposed\n{gateway.log()}")
