"""The task port under hostile or careless peers: tokens, idle and half-open
connections, per-connection and per-process limits."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from greentask import TaskClient, Unauthorized

from .conftest import ROOT, wait_until

pytestmark = pytest.mark.timeout(60)

TOKEN = "s3cret-token-for-the-tests-0123456789"


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture
def secured(make_daemon, token_file):
    return make_daemon(auth_token_file=token_file)


def test_requests_without_the_token_are_refused_and_the_connection_closed(secured, connect):
    conn = connect(secured.port)
    conn.send(b'{"function": "pid", "id": 1}\n{"function": "pid", "id": 2}\n')
    reply = conn.read_json()
    assert reply["error"]["type"] == "Unauthorized"
    assert '{"auth": TOKEN}' in reply["error"]["message"]
    # The second request was read with the first: answered, and not run either.
    second = conn.read_json()
    assert second["id"] == 2 and second["error"]["type"] == "Unauthorized"
    assert conn.at_eof()
    wrong = connect(secured.port)
    wrong.send(b'{"auth": "guess"}\n{"function": "pid"}\n')
    assert wrong.read_json()["error"]["type"] == "Unauthorized"
    assert wrong.read_json()["error"]["type"] == "Unauthorized"
    assert wrong.at_eof()


def test_a_wrong_token_fails_every_concurrent_call_with_unauthorized(secured):
    # Not WorkerLost: the server runs nothing before the token, and lingers
    # when it closes, so no request is reset.
    with TaskClient([secured.address], auth_token="wrong-token-of-some-length") as client:
        handles = [client.submit("echo", i) for i in range(5)]
        outcomes = []
        for handle in handles:
            try:
                handle.get(timeout=10)
                outcomes.append("ok")
            except Exception as exc:
                outcomes.append(f"{type(exc).__name__}: {exc}")
    assert [outcome.split(":")[0] for outcome in outcomes] == ["Unauthorized"] * 5, outcomes


def test_the_right_token_opens_the_connection(secured, connect):
    conn = connect(secured.port)
    conn.send(json.dumps({"auth": TOKEN}) + "\n")
    assert conn.call({"function": "echo", "args": [1]}) == {"ok": True, "result": [1]}
    with TaskClient([secured.address], auth_token=TOKEN) as client:
        assert client.call("echo", 2) == [2]
    with TaskClient([secured.address]) as client, pytest.raises(Unauthorized):
        client.call("echo", 3)


def test_cli_reads_the_token_file_from_the_config(secured):
    greentask = str(Path(sys.executable).with_name("greentask"))
    result = subprocess.run([greentask, "call", "echo", "[4]", "-c", str(secured.config)],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[4]"


def test_failures_are_logged_without_the_token(make_daemon, token_file, connect):
    secured = make_daemon(processes=1, auth_token_file=token_file)  # counts are per process
    for _ in range(10):
        conn = connect(secured.port)
        conn.send(b'{"auth": "%s-wrong"}\n' % TOKEN.encode())
        assert conn.read_json()["error"]["type"] == "Unauthorized"
    wait_until(lambda: "(10 times)" in secured.log(), 5, "the tenth failure logged")
    assert "from 127.0.0.1 refused: no token, or the wrong one (1 time)" in secured.log()
    assert TOKEN not in secured.log()


def test_a_token_file_others_can_read_is_refused(tmp_path, token_file):
    token_file.chmod(0o644)
    result = subprocess.run([sys.executable, "-m", "greentask.worker", "--check"], cwd=ROOT,
                            env={**os.environ, "GREENTASK_WORKER_AUTH_TOKEN_FILE": str(token_file)},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "can be read by others (mode 644); run chmod 600 on it" in result.stderr
    assert TOKEN not in result.stderr


def test_gateway_uses_the_token(secured, make_gateway, token_file):
    ws = make_gateway(secured, auth_token_file=token_file).connect()
    ws.send(json.dumps({"function": "echo", "args": [5], "id": 5}))
    assert json.loads(ws.recv())["result"] == [5]


def test_half_a_line_for_longer_than_idle_timeout_is_closed(make_daemon, connect):
    daemon = make_daemon(idle_timeout=1)
    slow = connect(daemon.port)
    for byte in b'{"function": "ec':  # slowloris: a byte now and then, never a line
        slow.send(bytes([byte]))
        time.sleep(0.15)
        if byte == ord("c"):
            break
    reply = slow.read_json()
    assert reply["error"]["type"] == "Timeout"
    assert "incomplete" in reply["error"]["message"] or "no complete request" in \
        reply["error"]["message"]
    assert slow.at_eof()
    silent = connect(daemon.port)
    assert "idle_timeout" in silent.read_json()["error"]["message"]
    assert silent.at_eof()


def test_idle_pipelining_client_is_asked_to_close_and_reconnects(make_daemon):
    daemon = make_daemon(idle_timeout=0.5)
    with TaskClient([daemon.address], connections_per_server=1) as client:
        assert client.call("echo", 1) == [1]
        first = client._pool.connections[0]
        wait_until(lambda: not first.calls.alive, 5, "the idle connection to close")
        assert client.call("echo", 2) == [2]
    assert "Traceback" not in daemon.log()


def test_max_inflight_per_connection_holds_requests_back_without_dropping(make_daemon,
                                                                           connect):
    daemon = make_daemon(processes=1, max_inflight_per_connection=2)
    conn = connect(daemon.port, timeout=20)
    conn.send(b"".join(b'{"function":"gauge","args":[0.1],"id":%d}\n' % i for i in range(8)))
    replies = [conn.read_json() for _ in range(8)]
    assert sorted(r["id"] for r in replies) == list(range(8))
    assert max(r["result"] for r in replies) == 2


def test_max_connections_lets_a_new_client_in_past_idle_sockets(make_daemon):
    daemon = make_daemon(processes=1, max_connections=20, closing_grace=1)
    flood = []
    try:
        for _ in range(60):  # silent sockets: three times what the worker serves
            flood.append(socket.create_connection(("127.0.0.1", daemon.port), timeout=10))
        with TaskClient([daemon.address], timeout=5) as client:
            assert client.call("echo", "let in") == ["let in"]
        told = flood[0].recv(100)  # the oldest was asked to make room
        assert told == b'{"closing":true}\n'
    finally:
        for sock in flood:
            sock.close()
    assert "Traceback" not in daemon.log()


def test_max_connections_never_closes_a_busy_peer_to_make_room(make_daemon, connect):
    daemon = make_daemon(processes=1, max_connections=2)
    first, second = connect(daemon.port, timeout=20), connect(daemon.port, timeout=20)
    for conn in (first, second):
        conn.send_json({"function": "sleep", "args": [1]})
    wait_until(lambda: daemon.inflight() == 2, 10, "both tasks running")
    third = connect(daemon.port, timeout=20)
    third.send_json({"function": "echo", "args": [3]})
    assert third.read_json() == {"ok": True, "result": [3]}
    # Busy when the third came: each gets its result first, whatever follows.
    assert first.read_json() == {"ok": True, "result": 1}
    assert second.read_json() == {"ok": True, "result": 1}


BAD = ROOT / "tests" / "data" / "bad"


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """One daemon that the whole hostile corpus is thrown at."""
    from .conftest import Daemon
    daemon = Daemon(tmp_path_factory.mktemp("hostile"), max_line="1MiB").start()
    yield daemon
    daemon.stop()


def replies_until_closed(conn) -> list[dict]:
    """Every reply line until the server closes (after our half-close)."""
    lines = []
    while True:
        try:
            lines.append(json.loads(conn.read_line()))
        except EOFError:
            return lines


def assert_still_serving(daemon, children: list[int]) -> None:
    with TaskClient([daemon.address], timeout=10) as client:
        assert client.call("echo", "alive") == ["alive"]
    assert sorted(daemon.children()) == sorted(children)  # no worker crashed


@pytest.mark.parametrize("case", sorted(BAD.glob("*.bin")), ids=lambda path: path.name)
def test_hostile_corpus_whole_and_chunked(target, connect, case):
    import random
    children = target.children()
    data = case.read_bytes()
    rng = random.Random(case.name)
    for chunked in (False, True):
        conn = connect(target.port, timeout=20)
        if chunked:
            at = 0
            while at < len(data):
                size = rng.randint(1, 7)
                conn.send(data[at:at + size])
                at += size
        else:
            conn.send(data)
        conn.sock.shutdown(socket.SHUT_WR)
        for reply in replies_until_closed(conn):
            assert "ok" in reply and (reply["ok"] or reply["error"]["type"] in (
                "BadRequest", "UnknownFunction", "TaskError", "TooLarge"))
    assert_still_serving(target, children)


def rss_of(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/statm") as statm:
            total += int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return total


def test_100_mb_without_a_newline_costs_no_memory(target, connect):
    children = target.children()
    before = rss_of(children)
    conn = connect(target.port, timeout=20)
    chunk = b"x" * (1024 * 1024)
    try:
        for _ in range(100):
            conn.send(chunk)
    except ConnectionError:
        pass  # the server stopped reading once it had answered
    assert conn.read_json()["error"]["type"] == "TooLarge"
    assert rss_of(children) - before < 16 * 1024 * 1024
    assert_still_serving(target, children)


def test_ten_thousand_requests_in_one_write_and_one_byte_at_a_time(target, connect):
    children = target.children()
    conn = connect(target.port, timeout=30)
    conn.send(b"".join(b'{"function":"echo","args":[%d],"id":%d}\n' % (i, i)
                       for i in range(10000)))
    ids = sorted(conn.read_json()["id"] for _ in range(10000))
    assert ids == list(range(10000))
    for byte in b'{"function": "echo", "args": ["bytewise"]}\n':
        conn.send(bytes([byte]))
    assert conn.read_json() == {"ok": True, "result": ["bytewise"]}
    assert_still_serving(target, children)


@pytest.mark.timeout(90)
def test_chaos_a_child_killed_every_second_under_200_callers(make_daemon):
    import signal as signals
    import threading

    from greentask import WorkerLost
    daemon = make_daemon()
    stop = threading.Event()
    outcomes: dict[bool, list[str]] = {True: [], False: []}
    with TaskClient([daemon.address], timeout=15, connections_per_server=4) as client:
        def caller(retry: bool) -> None:
            while not stop.is_set():
                try:
                    client.call("sleep", 0.05, retry=retry)
                    outcomes[retry].append("ok")
                except WorkerLost:
                    outcomes[retry].append("lost")
                except Exception as exc:  # counted: asserted empty below
                    outcomes[retry].append(repr(exc))
        callers = [threading.Thread(target=caller, args=(i % 2 == 0,)) for i in range(200)]
        for thread in callers:
            thread.start()
        kills = 0
        for _ in range(10):
            time.sleep(1)
            children = daemon.children()
            if children:
                os.kill(children[0], signals.SIGKILL)
                kills += 1
        stop.set()
        for thread in callers:
            thread.join(30)
        assert not any(thread.is_alive() for thread in callers)  # nothing hung
    assert set(outcomes[True]) == {"ok"}
    assert set(outcomes[False]) <= {"ok", "lost"} and "lost" in outcomes[False]
    assert len(outcomes[True]) > 1000
    daemon.wait_for_children(2, 10)
    print(f"chaos: {kills} workers killed; retry=True: {len(outcomes[True])} calls, all ok; "
          f"retry=False: {outcomes[False].count('ok')} ok, {outcomes[False].count('lost')} "
          "WorkerLost")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.timeout(120)
def test_soak_100000_calls_keep_memory_and_descriptors_flat(make_daemon):
    daemon = make_daemon()
    with TaskClient([daemon.address], timeout=30, connections_per_server=2) as client:
        def batch(count: int) -> None:
            handles = [client.submit("echo", i) for i in range(count)]
            assert [h.get() for h in handles] == [[i] for i in range(count)]
        for _ in range(4):
            batch(5000)  # warm-up: pools, runners, allocator arenas
        pids = [daemon.pid, *daemon.children()]
        rss_before = {pid: rss_of([pid]) for pid in pids}
        fds_before = {pid: fd_count(pid) for pid in pids}
        for _ in range(16):
            batch(5000)

        def flat() -> bool:  # once a heartbeat has trimmed the idle runners
            return all(rss_of([pid]) - rss_before[pid] < 8 * 1024 * 1024
                       and fd_count(pid) <= fds_before[pid] for pid in pids)
        wait_until(flat, 10, "memory and descriptors back where they were")


def test_a_peer_that_never_reads_its_replies_is_cut_off_after_idle_timeout(make_daemon):
    daemon = make_daemon(processes=1, idle_timeout=1)
    greedy = socket.socket()
    greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # replies back up at once
    greedy.connect(("127.0.0.1", daemon.port))
    # 8 MB of whole requests, then never a read: the kernel's send buffer
    # takes up to 4 MB of the replies, the rest waits in the worker (which
    # stops reading at a quarter of max_queued_replies, 4 MiB).
    big = b'{"function":"echo","args":["' + b"y" * 20000 + b'"],"id":1}\n'
    greedy.settimeout(30)
    try:
        greedy.sendall(big * 400)
    except ConnectionError:
        pass  # on a machine with smaller buffers, the cut-off came first

    def connections() -> int:
        return sum(worker["connections"] for worker in daemon.status()["workers"])
    wait_until(lambda: connections() == 0, 15, "the stalled connection to be cut off")
    cut = re.search(r"cut off, its peer does not read: it took none of its replies for 1 s "
                    r"\(\[worker\] idle_timeout\); (\d+) replies dropped", daemon.log())
    assert cut and int(cut[1]) > 0, daemon.log()
    greedy.close()
    with TaskClient([daemon.address]) as client:
        assert client.call("echo", "fine") == ["fine"]


def test_max_json_depth_is_a_setting_answered_with_bad_request(make_daemon, connect):
    daemon = make_daemon(processes=1, max_json_depth=4)
    conn = connect(daemon.port)
    deep = conn.call({"function": "echo", "args": [[[["four levels"]]]], "id": 1})
    assert deep["error"]["type"] == "BadRequest"
    assert "max_json_depth" in deep["error"]["message"] and deep["id"] == 1
    assert conn.call({"function": "echo", "args": [[["three"]]], "id": 2})["result"] == \
        [[["three"]]]
