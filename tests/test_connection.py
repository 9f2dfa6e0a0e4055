"""Connections in-process (tier 2): a real ProcessServer on a loopback port, no fork.

The server runs on this process's gevent hub; the peers are gevent sockets, so
the test, the server and its tasks share one event loop.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.socket
import pytest
import ujson
from gevent.event import Event

from greentask.config import load
from greentask.daemon import scoreboard
from greentask.daemon.connection import IDLE_GRACE, Connection, Phase
from greentask.daemon.lifecycle import StateError
from greentask.daemon.server import ProcessServer
from greentask.protocol import Request
from greentask.registry import Registry
from tests.test_runner import Replies, green_wait

RELEASE = Event()


def tasks() -> Registry:
    registry = Registry()
    registry.add(lambda value: value, "echo")
    registry.add(lambda: RELEASE.wait(), "hold")
    registry.add(lambda value: RELEASE.wait() and value, "echo_when_released")
    return registry


class Peer:
    """A client socket that writes and reads whole JSON lines."""

    def __init__(self, port: int) -> None:
        self.sock = gevent.socket.create_connection(("127.0.0.1", port))
        self.buffer = b""

    def send(self, *lines: Any) -> None:
        self.sock.sendall(b"".join((line if isinstance(line, bytes) else
                                    ujson.dumps(line).encode()) + b"\n" for line in lines))

    def read(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The next reply line, or None at end of stream."""
        with gevent.Timeout(timeout):
            while b"\n" not in self.buffer:
                data = self.sock.recv(65536)
                if not data:
                    return None
                self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return ujson.loads(line)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def make_server() -> Iterator[Any]:
    made: list[ProcessServer] = []

    def make(**worker: str) -> ProcessServer:
        overrides = {("worker", key): value for key, value in worker.items()}
        config = load(environ={}, overrides=overrides)
        listener = gevent.socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        board = scoreboard.Scoreboard(1)
        server = ProcessServer(listener, config, tasks(), master_pid=0,
                               slot=board.slot(board.claim(generation=1)))
        server.server.start()
        server.runner.sweep.start()
        made.append(server)
        return server

    RELEASE.clear()
    yield make
    RELEASE.set()
    for server in made:
        server.runner.sweep.stop()
        server.server.stop(timeout=1)


def port_of(server: ProcessServer) -> int:
    return server.server.socket.getsockname()[1]


def only_connection(server: ProcessServer) -> Connection:
    green_wait(lambda: len(server.connections) == 1, 5, "the connection")
    return next(iter(server.connections))


def test_pipelined_requests_past_the_connection_limit_wait_in_tcp(make_server):
    server = make_server(max_inflight_per_connection="2")
    peer = Peer(port_of(server))
    peer.send(*({"function": "hold", "id": i} for i in range(5)))
    connection = only_connection(server)
    green_wait(lambda: connection.inflight == 2, 5, "two tasks in flight")
    gevent.sleep(0.05)
    assert connection.inflight == 2 and len(server.runner.running) == 2
    RELEASE.set()
    replies = [peer.read() for _ in range(5)]
    assert sorted(reply["id"] for reply in replies) == [0, 1, 2, 3, 4]
    assert all(reply["ok"] for reply in replies)
    green_wait(lambda: connection.inflight == 0, 5, "nothing in flight")


def test_bad_lines_are_answered_and_the_connection_keeps_serving(make_server):
    server = make_server()
    peer = Peer(port_of(server))
    peer.send(b"{not json", {"function": "nope", "id": 1}, {"function": "echo", "args": [2]})
    assert peer.read()["error"]["type"] == "BadRequest"
    assert peer.read() == {"id": 1, "ok": False, "error": {
        "type": "UnknownFunction", "message": "no task named 'nope'; this server has "
        "['echo', 'echo_when_released', 'hold'] (add its module to [worker] tasks)"}}
    assert peer.read() == {"ok": True, "result": 2}


def test_a_token_is_checked_before_any_request(make_server, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-of-enough-length")
    token_file.chmod(0o600)
    server = make_server(auth_token_file=str(token_file))
    good = Peer(port_of(server))
    good.send({"auth": "s3cret-token-of-enough-length"}, {"function": "echo", "args": [1]})
    assert good.read() == {"ok": True, "result": 1}
    bad = Peer(port_of(server))
    bad.send({"auth": "wrong"}, {"function": "echo", "args": [1], "id": 7})
    assert bad.read()["error"]["type"] == "Unauthorized"
    # The request read with the bad token is answered (not run), then the end.
    refused = bad.read()
    assert refused["id"] == 7 and refused["error"]["type"] == "Unauthorized"
    assert bad.read() is None


def test_an_idle_pipelining_peer_is_asked_to_close_then_closed(make_server):
    server = make_server()
    peer = Peer(port_of(server))
    peer.send({"function": "echo", "args": [1], "id": 1})
    assert peer.read()["ok"]
    connection = only_connection(server)
    later = time.monotonic() + 1000
    connection.check_idle(later, limit=1)
    assert connection.phase is Phase.ASKED_TO_CLOSE
    assert peer.read() == {"closing": True}
    connection.check_idle(later, limit=1)
    assert connection.phase is Phase.ASKED_TO_CLOSE  # the peer gets IDLE_GRACE to close
    connection.check_idle(connection.phase_since + IDLE_GRACE + 1, limit=1)
    assert connection.phase is Phase.CLOSING
    assert peer.read() is None


def test_an_idle_plain_peer_is_told_why_and_closed(make_server):
    server = make_server()
    peer = Peer(port_of(server))
    peer.send({"function": "echo", "args": [1]})
    assert peer.read()["ok"]
    connection = only_connection(server)
    connection.check_idle(time.monotonic() + 1000, limit=1)
    reply = peer.read()
    assert reply["error"]["type"] == "Timeout" and "idle_timeout" in reply["error"]["message"]
    assert peer.read() is None


def test_a_drain_tells_pipelining_peers_and_refuses_new_requests(make_server):
    server = make_server(graceful_timeout="5")
    peer = Peer(port_of(server))
    peer.send({"function": "hold", "id": 1})
    connection = only_connection(server)
    green_wait(lambda: server.runner.running, 5, "the task")
    server.stop_gracefully()
    assert peer.read() == {"closing": True}
    assert connection.phase is Phase.ASKED_TO_CLOSE
    peer.send({"function": "echo", "args": [1], "id": 2})
    refused = peer.read()
    assert refused["id"] == 2 and refused["error"]["type"] == "ShuttingDown"
    RELEASE.set()
    assert peer.read() == {"id": 1, "ok": True, "result": True}
    peer.close()
    green_wait(lambda: server._stopped.is_set(), 10, "the drain to finish")


def test_a_phase_moves_only_forward(make_server):
    server = make_server()
    peer = Peer(port_of(server))
    peer.send({"function": "echo", "args": [1]})
    assert peer.read()["ok"]
    connection = only_connection(server)
    connection._close()
    with pytest.raises(StateError, match="cannot move from closing to open"):
        connection._enter(Phase.OPEN)


def stack_room() -> int:
    """How many more frames this greenlet can push before RecursionError."""
    def down(depth: int) -> int:
        try:
            return down(depth + 1)
        except RecursionError:
            return depth
    return down(0)


#: Frames between a reader greenlet's start and a task it runs itself
#: (handle_connection ... Connection._read_loop, _handle_line, submit).
READ_PATH_FRAMES = 12


def test_tasks_start_in_greenlets_as_shallow_as_the_hubs(make_server):
    # Greenlets inherit the stack depth they are first switched to from. One
    # created by a reader (say, to start a task at once) would start at the
    # reader's depth, readers it later served deeper still, until
    # RecursionError closed connections under load: seen at 512 connections
    # when tasks were started that way. Task and reader greenlets are made by
    # the hub; a task that runs in its reader is only the read path deeper.
    server = make_server()

    def room(wait: bool) -> int:
        if wait:  # reading is handed over to another greenlet meanwhile
            gevent.sleep(0)
        return stack_room()

    server.runner.registry.add(room, "room")
    rooms = set()
    for round_number in range(6):
        # More peers each round, so each round needs new greenlets.
        peers = [Peer(port_of(server)) for _ in range(2 + 4 * round_number)]
        for peer in peers:
            peer.send(*({"function": "room", "args": [i % 2 == 0], "id": i}
                        for i in range(4)))
        for peer in peers:
            replies = [peer.read() for _ in range(4)]
            assert all(reply and reply["ok"] for reply in replies), replies
            rooms.update(reply["result"] for reply in replies)
            peer.close()
        green_wait(lambda: not server.connections, 5, "the peers to be gone")
    # The same task in a greenlet the hub made: every task above had as much
    # room, less the read path's frames; more rounds never took more.
    runner, owner = server.runner, Replies()
    runner.greenlets.kill_idle()  # and forgets them: the next spawn makes a new one
    runner.spawn(runner._run, Request("room", [False], 0), room, owner)
    green_wait(lambda: owner.finished, 5, "the reference task")
    assert min(rooms) >= owner.final(0)["result"] - READ_PATH_FRAMES, (sorted(rooms),
                                                                       owner.lines)


def test_a_drain_tells_a_peer_that_sent_nothing_yet_and_answers_what_it_sends(make_server):
    # The reload race: a client's fresh connection lands on a worker that
    # drains before the client wrote anything. It must be told, not reset.
    server = make_server(closing_grace="30")
    peer = Peer(port_of(server))
    connection = only_connection(server)
    server.stop_gracefully()
    assert peer.read() == {"closing": True}
    assert connection.phase is Phase.ASKED_TO_CLOSE
    peer.send(*({"function": "echo", "args": [i], "id": i} for i in range(3)))
    replies = [peer.read() for _ in range(3)]
    assert [(r["id"], r["error"]["type"]) for r in replies] == [(i, "ShuttingDown")
                                                                   for i in range(3)]
    peer.close()
    green_wait(lambda: server._stopped.is_set(), 5, "the drain to end once the peer closed")


def test_a_drain_closes_a_told_peer_that_keeps_its_idle_socket_after_closing_grace(
        make_server):
    server = make_server(graceful_timeout="30", closing_grace="0.2")
    peer = Peer(port_of(server))
    peer.send({"function": "echo", "args": [1], "id": 1})
    assert peer.read()["ok"]
    started = time.monotonic()
    server.stop_gracefully()
    assert peer.read() == {"closing": True}
    assert peer.read() is None  # a clean end of stream, not a reset
    green_wait(lambda: server._stopped.is_set(), 5, "the drain to end")
    assert time.monotonic() - started < 10  # closing_grace, not graceful_timeout


def test_a_drain_answers_every_line_an_id_less_peer_already_sent(make_server):
    server = make_server()
    peer = Peer(port_of(server))
    # One read holds all three lines; the first runs while the drain starts.
    peer.send({"function": "hold"}, {"function": "echo", "args": [1]},
              {"function": "echo", "args": [2]})
    green_wait(lambda: server.runner.running, 5, "the task")
    server.stop_gracefully()
    gevent.sleep(0.05)
    RELEASE.set()
    assert peer.read() == {"ok": True, "result": True}
    assert [peer.read()["error"]["type"] for _ in range(2)] == ["ShuttingDown"] * 2
    assert peer.read() is None
    green_wait(lambda: server._stopped.is_set(), 5, "the drain to end")


def flood_without_reading(server: ProcessServer, requests: int,
                          function: str = "echo") -> tuple[Connection, Any]:
    """A peer that sends ``requests`` 60 KB echoes and reads none of the replies."""
    peer = Peer(port_of(server))
    peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    big = "x" * 60_000
    sender = gevent.spawn(peer.send, *({"function": function, "args": [big], "id": i}
                                       for i in range(requests)))
    return only_connection(server), sender


def test_a_peer_that_never_reads_is_no_longer_read_past_the_high_water_mark(make_server):
    # Tasks that never wait run in the reader, one line at a time: it stops
    # reading as soon as its writer holds a quarter of max_queued_replies.
    server = make_server(max_queued_replies="512KiB")
    connection, sender = flood_without_reading(server, 400)
    green_wait(lambda: not connection.writer.writable.is_set(), 10, "the writer to stall")
    done = server.slot.get(scoreboard.DONE)
    gevent.sleep(0.1)
    assert server.slot.get(scoreboard.DONE) == done  # nothing more is read or run
    assert connection.writer.size <= 512 * 1024 // 4 + 2 * 70_000
    assert server.connections  # cut off by idle_timeout, not by the bound
    sender.kill()


def test_a_peer_that_never_reads_is_cut_off_at_max_queued_replies(make_server):
    # Tasks that wait run beside the reader, which goes on reading: their
    # replies can pass the high-water mark, never max_queued_replies.
    server = make_server(max_queued_replies="512KiB")
    connection, sender = flood_without_reading(server, 400, "echo_when_released")
    green_wait(lambda: len(server.runner.running) >= 12, 10, "12 tasks waiting")
    RELEASE.set()  # 12 replies of 60 KB at once: past the bound
    largest = 0
    deadline = time.monotonic() + 10
    while server.connections and time.monotonic() < deadline:
        largest = max(largest, connection.writer.size)
        gevent.sleep(0.001)
    assert not server.connections, "the connection should have been cut off"
    assert connection.writer.cut_off_reason and "max_queued_replies" in \
        connection.writer.cut_off_reason
    assert largest <= 512 * 1024 + 70_000  # the bound, plus at most one reply
    sender.kill()


def test_a_closing_peer_that_stops_reading_is_still_cut_off(make_server):
    # A connection being closed (slowloris, idleness, a drain) whose reader
    # waits for its writer: the stalled-writer rule must still end it.
    server = make_server(max_queued_replies="64MiB")
    connection, sender = flood_without_reading(server, 600)
    green_wait(lambda: not connection.writer.writable.is_set(), 10, "the writer to stall")
    connection._close_with("a request line stayed incomplete")
    assert connection.phase is Phase.CLOSING
    gevent.sleep(0.05)
    assert server.connections  # still there: its replies wait for the peer
    connection.check_idle(time.monotonic() + 200, limit=1)
    green_wait(lambda: not server.connections, 5, "the stalled peer to be cut off")
    assert "idle_timeout" in connection.writer.cut_off_reason
    sender.kill()


def test_a_full_process_makes_room_by_closing_its_oldest_idle_connection(make_server):
    server = make_server(max_connections="3", closing_grace="0.2")
    plain = Peer(port_of(server))  # id-less and idle: closed with a reason
    plain.send({"function": "echo", "args": [1]})
    assert plain.read()["ok"]
    silent = Peer(port_of(server))  # sent nothing yet: told to close
    green_wait(lambda: len(server.connections) == 2, 5, "two connections")
    busy = Peer(port_of(server))  # a task in flight: never chosen
    busy.send({"function": "hold", "id": 1})
    green_wait(lambda: server.runner.running, 5, "the busy peer's task")
    newcomer = Peer(port_of(server))
    newcomer.send({"function": "echo", "args": ["in"], "id": 1})
    assert newcomer.read() == {"id": 1, "ok": True, "result": "in"}
    evicted = plain.read()
    assert evicted["error"]["type"] == "Timeout" and "max_connections" in \
        evicted["error"]["message"]
    assert plain.read() is None
    latecomer = Peer(port_of(server))
    latecomer.send({"function": "echo", "args": ["also"], "id": 2})
    assert latecomer.read() == {"id": 2, "ok": True, "result": "also"}
    assert silent.read() == {"closing": True}
    for connection in list(server.connections):
        connection.check_idle(time.monotonic() + 1, limit=300)  # as the heartbeat does
    assert silent.read() is None
    RELEASE.set()
    assert busy.read() == {"id": 1, "ok": True, "result": True}


def test_a_peer_that_does_not_send_its_token_in_time_is_told_and_closed(make_server, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token-of-enough-length")
    token_file.chmod(0o600)
    server = make_server(auth_token_file=str(token_file), hello_timeout="1")
    silent = Peer(port_of(server))
    connection = only_connection(server)
    connection.check_idle(time.monotonic() + 0.5, limit=300)
    assert connection.phase is Phase.HELLO  # still in time
    connection.check_idle(time.monotonic() + 2, limit=300)
    reply = silent.read()
    assert reply["error"]["type"] == "Unauthorized" and "hello_timeout" in \
        reply["error"]["message"]
    assert silent.read() is None


def test_connections_past_the_per_peer_limit_are_told_and_refused(make_server):
    server = make_server(max_connections_per_peer="2")
    first, second = Peer(port_of(server)), Peer(port_of(server))
    green_wait(lambda: len(server.connections) == 2, 5, "two connections")
    third = Peer(port_of(server))
    assert third.read() == {"closing": True}
    third.send({"function": "echo", "args": [1], "id": 9})
    refused = third.read()
    assert refused["id"] == 9 and refused["error"]["type"] == "ShuttingDown"
    assert "max_connections_per_peer = 2" in refused["error"]["message"]
    for peer in (first, second):
        peer.send({"function": "echo", "args": [1], "id": 1})
        assert peer.read() == {"id": 1, "ok": True, "result": 1}
    third.close()
    first.close()
    green_wait(lambda: len(server.connections) == 1, 5, "the first and third to be gone")
    fourth = Peer(port_of(server))  # a place is free again
    fourth.send({"function": "echo", "args": [4], "id": 4})
    assert fourth.read() == {"id": 4, "ok": True, "result": 4}


def test_a_reader_waits_for_input_on_the_gevent_sockets_own_watcher(make_server):
    # A reader whose replies wait for the turn's batch waits on this watcher
    # before it reads (no recv failing with EAGAIN); were gevent to rename
    # it, the connection would silently go back to a recv first.
    server = make_server()
    first, second = Peer(port_of(server)), Peer(port_of(server))
    for peer in (first, second):
        peer.send({"function": "echo", "args": [0]})
        assert peer.read() == {"ok": True, "result": 0}
    # Both lines arrive in one loop turn: the first reader's reply is batched.
    first.send({"function": "echo", "args": [1]})
    second.send({"function": "echo", "args": [2]})
    assert (first.read(), second.read()) == ({"ok": True, "result": 1},
                                             {"ok": True, "result": 2})
    for connection in server.connections:
        assert connection._readable is not None
        assert connection._readable is connection.sock._read_event
