"""TaskClient against real daemons: pipelining, failover, lost workers, plain servers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from greentask import (
    BadArguments,
    ConnectionFailed,
    TaskClient,
    TaskError,
    TaskTimeout,
    UnknownFunction,
    WorkerLost,
)

from .conftest import free_port, wait_until

pytestmark = pytest.mark.timeout(60)


def test_call_returns_results_and_raises_remote_errors_as_their_class(daemon):
    with TaskClient([daemon.address]) as client:
        assert client.call("echo", 1, 2) == [1, 2]
        assert client.call("echo", a=1) == {"a": 1}
        assert client.apply("echo", {"timeout": 3}).get() == {"timeout": 3}
        with pytest.raises(TaskError, match="RuntimeError: nope") as info:
            client.call("fail", "nope")
        assert (info.value.type, info.value.message) == ("TaskError", "RuntimeError: nope")
        with pytest.raises(UnknownFunction):
            client.call("missing")
        with pytest.raises(BadArguments):
            client.call("sleep")
        with pytest.raises(TypeError, match="not both"):
            client.submit("echo", 1, a=2)


def test_done_callbacks_run_once_with_the_outcome(daemon):
    outcomes: list[object] = []
    finished = threading.Event()

    def record(handle) -> None:
        try:
            outcomes.append(handle.get(0))
        except TaskError as exc:
            outcomes.append(type(exc))
        if len(outcomes) == 3:
            finished.set()
    with TaskClient([daemon.address]) as client:
        client.submit("sleep", 0.2).add_done_callback(record)  # while it runs
        client.submit("fail", "no").add_done_callback(record)
        done = client.submit("echo", 1)
        done.get(10)
        done.add_done_callback(record)  # after: at once, in this thread
        assert finished.wait(10)
    assert sorted(map(str, outcomes)) == sorted(map(str, [0.2, TaskError, [1]]))


def test_timeouts_on_the_server_and_while_waiting(daemon):
    with TaskClient([daemon.address]) as client:
        with pytest.raises(TaskTimeout, match=r"ran longer than 0\.2 s"):
            client.call("sleep", 5, timeout=0.2)
        handle = client.submit("sleep", 1)
        with pytest.raises(TaskTimeout, match=r"no reply to task .sleep. within 0\.1 s"):
            handle.get(timeout=0.1)
        assert handle.get(timeout=5) == 1


def test_progress_callback(daemon):
    seen = []
    with TaskClient([daemon.address]) as client:
        assert client.call("steps.count", 4, on_progress=seen.append) == 4
    assert seen == [{"step": i} for i in range(1, 5)]


def test_many_threads_share_the_connections(daemon):
    results = {}
    with TaskClient([daemon.address]) as client:
        def work(n):
            results[n] = [client.call("echo", n, i) for i in range(50)]
        threads = [threading.Thread(target=work, args=(n,)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert results == {n: [[n, i] for i in range(50)] for n in range(20)}


def test_failover_to_the_second_server(daemon):
    down = f"127.0.0.1:{free_port()}"
    with TaskClient([down, daemon.address]) as client:
        for _ in range(10):
            assert client.call("echo", "ok") == ["ok"]


def test_no_server_up_is_connection_failed():
    ports = [free_port(), free_port()]
    with TaskClient([f"127.0.0.1:{p}" for p in ports]) as client:
        with pytest.raises(ConnectionFailed, match="cannot connect to any task server") as info:
            client.call("echo")
    assert all(str(p) in str(info.value) for p in ports)


def test_worker_lost_when_the_child_dies_mid_task_and_retry_resends(daemon):
    with TaskClient([daemon.address], connections_per_server=1) as client:
        pid = client.call("pid")
        handle = client.submit("sleep", 5)
        threading.Event().wait(0.3)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerLost, match="retry=True"):
            handle.get(timeout=10)
    with TaskClient([daemon.address], connections_per_server=1) as client:
        pid = client.call("pid")
        handle = client.submit("sleep", 0.5, retry=True)
        threading.Event().wait(0.2)
        os.kill(pid, signal.SIGKILL)
        assert handle.get(timeout=10) == 0.5
        assert handle.attempts == 2


def test_shutting_down_reply_is_sent_again_elsewhere(daemon):
    with TaskClient([daemon.address], connections_per_server=1) as client:
        pid = client.call("pid")
        busy = client.submit("sleep", 1)
        threading.Event().wait(0.2)
        os.kill(pid, signal.SIGTERM)
        threading.Event().wait(0.2)
        again = client.submit("pid")
        assert again.get(timeout=10) != pid
        assert busy.get(timeout=10) == 1
        wait_until(lambda: len(daemon.children()) == 2 and pid not in daemon.children(), 5,
                   "the drained child to be replaced")


def serve_plain_text_task_server(listener: socket.socket) -> None:
    """A Workerman-style Text protocol server: answers each line with bare JSON, no id."""
    conn, _ = listener.accept()
    with conn, conn.makefile("rwb") as stream:
        for _line in stream:
            stream.write(b'{"status": "sent"}\n')
            stream.flush()


def test_works_against_a_plain_text_task_server():
    listener = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=serve_plain_text_task_server, args=(listener,),
                              daemon=True)
    thread.start()
    port = listener.getsockname()[1]
    with TaskClient([f"127.0.0.1:{port}"], connections_per_server=1) as client:
        assert client.call("send_mail", to="a@example.org") == {"status": "sent"}
        assert client.call("send_mail", to="b@example.org") == {"status": "sent"}
    thread.join(5)
    listener.close()


GREENLET_CALLER = """
from gevent import monkey
monkey.patch_all()
import sys, gevent
from greentask import TaskClient
client = TaskClient([sys.argv[1]])
jobs = [gevent.spawn(client.call, "sleep", 0.2) for _ in range(200)]
gevent.joinall(jobs, timeout=20, raise_error=True)
print(sum(job.value for job in jobs))
"""


def test_works_from_greenlets_in_a_monkey_patched_process(daemon):
    result = subprocess.run([sys.executable, "-c", GREENLET_CALLER, daemon.address],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) == pytest.approx(40.0)


BATCHING_CALLER = """
from gevent import monkey
monkey.patch_all()
import sys, gevent
from greentask import TaskClient
client = TaskClient([sys.argv[1]], connections_per_server=1, spawn=gevent.spawn)
jobs = [gevent.spawn(client.call, "send_mail", to=str(i)) for i in range(200)]
gevent.joinall(jobs, timeout=20, raise_error=True)
print(len([job for job in jobs if job.value == {"status": "sent"}]))
"""


def test_with_spawn_the_requests_of_one_turn_go_out_together():
    listener = socket.create_server(("127.0.0.1", 0))
    reads: list[int] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            buffer = b""
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                reads.append(data.count(b"\n"))
                buffer += data
                lines, _, buffer = buffer.rpartition(b"\n")
                conn.sendall(b'{"status": "sent"}\n' * (lines.count(b"\n") + 1))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    result = subprocess.run([sys.executable, "-c", BATCHING_CALLER, address],
                            capture_output=True, text=True, timeout=30)
    thread.join(5)
    listener.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["200"]
    # 200 greenlets asked in one turn of the loop: their lines came in a few
    # sends, not one each (a read may still split one send).
    assert sum(reads) == 200 and len(reads) <= 5, reads


def blocked_signals(native_id: int) -> int:
    """The signal mask of one thread of this process, from /proc."""
    with open(f"/proc/self/task/{native_id}/status") as status:
        line = next(line for line in status if line.startswith("SigBlk:"))
    return int(line.split()[1], 16)


def test_reader_threads_leave_signals_to_the_main_thread(daemon):
    # The kernel gives a process's SIGINT to any thread that does not block
    # it; taken by a reader, Ctrl-C would leave the main thread asleep in get().
    main_before = blocked_signals(threading.main_thread().native_id)
    with TaskClient([daemon.address], connections_per_server=2) as client:
        [client.submit("echo", i) for i in range(4)][-1].get()
        readers = [thread for thread in threading.enumerate()
                   if thread.name.startswith("greentask-reader-")]
        assert readers
        for reader in readers:
            mask = blocked_signals(reader.native_id)
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
                assert mask & (1 << (signum - 1)), (reader.name, signum)
    assert blocked_signals(threading.main_thread().native_id) == main_before  # restored


def test_the_core_gives_back_requests_never_wholly_written_as_not_sent():
    # Sans-IO: the bookkeeping a transport relies on when a write fails or
    # the connection ends with lines still queued.
    from greentask.calls import Call, CallConnection, GivenBack, Unanswered

    calls = CallConnection()
    first, second, third = (Call("echo", [i], 5.0, False) for i in range(3))
    assert calls.queue(first) is True  # the transport must arrange a write
    assert calls.queue(second) is False  # one is arranged already
    output = calls.take_output()
    assert output.data.count(b"\n") == 2
    first_end = output.ends[0][1]
    # Only the first line went out whole: the second never reached a server.
    assert calls.write_failed(output, first_end + 3) == [second]
    assert not calls.usable and calls.pending == 1
    fresh = CallConnection()
    fresh.queue(third)
    events = fresh.connection_lost("reset")
    assert events == [GivenBack(third, Unanswered.UNSENT, "reset")]
