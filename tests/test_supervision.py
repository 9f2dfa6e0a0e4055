"""The master as a supervisor: reload, watchdog, recycling, scaling (real signals)."""

from __future__ import annotations

import collections
import signal
import threading
import time

import pytest

from greentask import TaskClient, WorkerLost

from .conftest import pid_alive, wait_until, write_version_module

pytestmark = pytest.mark.timeout(90)


def test_reload_under_load_loses_nothing_and_serves_new_code(versioned):
    daemon, modules = versioned
    errors, results = [], []
    stop = threading.Event()
    with TaskClient([daemon.address], timeout=20) as client:
        def caller():
            while not stop.is_set():
                try:
                    results.append(client.call("version"))
                except Exception as exc:  # counted: the test asserts there are none
                    errors.append(repr(exc))
        callers = [threading.Thread(target=caller) for _ in range(200)]
        for thread in callers:
            thread.start()
        for version in range(2, 7):
            time.sleep(1)
            write_version_module(modules, version)
            daemon.signal(signal.SIGHUP)
        time.sleep(1)
        stop.set()
        for thread in callers:
            thread.join(30)
        assert errors == []
        assert len(results) > 1000
        assert set(results) <= {1, 2, 3, 4, 5, 6}
        wait_until(lambda: client.call("version") == 6, 10, "the last generation to serve")
    assert daemon.log().count("SIGHUP: reloading") == 5
    daemon.wait_for_children(2, 10)


def test_reload_with_a_broken_config_keeps_the_old_generation(versioned):
    daemon, _ = versioned
    children = daemon.children()
    daemon.config.write_text(daemon.config.read_text().replace(
        "[worker]\n", "[worker]\nconcurrency = many\n", 1))
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in daemon.log(), 5, "the refusal")
    assert "concurrency" in daemon.log()
    time.sleep(1)
    assert sorted(daemon.children()) == sorted(children)
    with TaskClient([daemon.address]) as client:
        assert client.call("version") == 1


def test_reload_with_a_task_module_that_does_not_import_keeps_the_old_generation(versioned):
    daemon, modules = versioned
    children = daemon.children()
    (modules / "versioned_tasks.py").write_text("raise ImportError('half-written file')\n")
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in daemon.log(), 15, "the failed reload")
    assert "ImportError: half-written file" in daemon.log()
    with TaskClient([daemon.address]) as client:
        assert client.call("version") == 1
    assert sorted(daemon.wait_for_children(2, 10)) == sorted(children)
    assert daemon.proc.poll() is None


def test_hung_worker_is_killed_and_replaced(make_daemon):
    daemon = make_daemon(heartbeat_timeout=2)
    with TaskClient([daemon.address], connections_per_server=1, timeout=30) as hog_client, \
            TaskClient([daemon.address], timeout=5) as other:
        hog_pid = hog_client.call("pid")
        hog = hog_client.submit("cpu", 10 ** 10)
        time.sleep(0.5)
        for _ in range(5):
            assert other.call("echo", 1) == [1]  # the other child keeps serving
        with pytest.raises(WorkerLost):
            hog.get(timeout=10)
        # Its sockets close as it dies; under load it can take a moment
        # more to be gone (SIGABRT, then SIGKILL after ABORT_GRACE).
        wait_until(lambda: not pid_alive(hog_pid), 10, "the hung worker to be gone")
        daemon.wait_for_children(2, 5, exclude={hog_pid})
        assert other.call("echo", 2) == [2]
    log = daemon.log()
    assert "event loop has been blocked" in log
    assert "Fatal Python error: Aborted" in log  # faulthandler's traceback of the hog


def test_workers_killed_from_outside_just_after_they_serve_do_not_stop_the_master(
        make_daemon):
    import os
    daemon = make_daemon()
    killed: set[int] = set()
    for _ in range(12):  # more than the 10 failed starts that stop the master
        def fresh_serving() -> int | None:
            log = daemon.log()
            return next((pid for pid in daemon.children()
                         if pid not in killed and f" worker {pid} serving" in log), None)
        victim = wait_until(fresh_serving, 15, "a worker that serves")
        os.kill(victim, signal.SIGKILL)  # as the OOM killer would, however young
        killed.add(victim)
    daemon.wait_for_children(2, 15, exclude=killed)
    assert daemon.proc.poll() is None
    with TaskClient([daemon.address]) as client:
        assert client.call("echo", "alive") == ["alive"]
    assert "stopping instead of looping" not in daemon.log()


def test_max_tasks_per_child_replaces_workers_without_failing_a_call(make_daemon):
    daemon = make_daemon(max_tasks_per_child=100, max_tasks_jitter=10)
    seen = set()
    with TaskClient([daemon.address], timeout=20) as client:
        for start in range(0, 2000, 500):
            serving = set(daemon.children())
            seen |= serving
            handles = [client.submit("pid") for i in range(start, start + 500)]
            served_by = collections.Counter(h.get() for h in handles)
            # 500 tasks take at least one child past 100 (the kernel may give
            # both connections to one child): it is replaced, and retired.
            def replaced(serving=serving):
                children = set(daemon.children())
                return len(children) == 2 and children - serving
            wait_until(replaced, 10, f"a replacement; served by {served_by}, serving {serving}")
    assert daemon.log().count("asks to be replaced") >= 4
    assert len(seen) >= 5


def test_ttin_and_ttou_change_the_number_of_children(daemon):
    daemon.signal(signal.SIGTTIN)
    daemon.wait_for_children(3, 5)
    # Signals of one kind sent back to back merge into one: wait between them.
    daemon.signal(signal.SIGTTOU)
    daemon.wait_for_children(2, 10)
    daemon.signal(signal.SIGTTOU)
    daemon.wait_for_children(1, 10)
    daemon.signal(signal.SIGTTOU)  # never fewer than one
    time.sleep(1)
    assert len(daemon.wait_for_children(1, 5)) == 1
    with TaskClient([daemon.address]) as client:
        assert client.call("echo", "still") == ["still"]


def test_a_stop_ends_when_the_work_is_done_though_an_idle_peer_keeps_its_socket(
        make_daemon, connect):
    daemon = make_daemon(processes=1, graceful_timeout=60)
    idle = connect(daemon.port, timeout=30)  # pipelines, then keeps its socket open
    assert idle.call({"function": "echo", "args": [1], "id": 1})["ok"]
    with TaskClient([daemon.address], timeout=60) as client:
        handles = [client.submit("sleep", 1) for _ in range(3)]
        wait_until(lambda: daemon.inflight() == 3, 15, "three tasks in flight")
        daemon.signal(signal.SIGTERM)
        assert [handle.get() for handle in handles] == [1, 1, 1]
    assert idle.read_json() == {"closing": True}
    assert idle.at_eof()  # closed after closing_grace (2 s): a clean end, no reset
    assert daemon.wait(25) == 0  # not graceful_timeout (60 s)


def test_graceful_stop_is_bounded_by_graceful_timeout(make_daemon):
    daemon = make_daemon(graceful_timeout=2)
    with TaskClient([daemon.address], timeout=30) as client:
        handles = [client.submit("sleep", 5) for _ in range(10)]
        time.sleep(0.3)
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        for handle in handles:
            with pytest.raises(WorkerLost):
                handle.get(timeout=10)
    assert daemon.wait(10) == 0
    assert time.monotonic() - started < 4  # graceful_timeout 2 s, then the kill


def test_max_memory_per_child_replaces_a_worker_that_grew(make_daemon):
    daemon = make_daemon(max_memory_per_child="80MiB")
    with TaskClient([daemon.address], connections_per_server=1) as client:
        grown = client.call("pid")
        client.call("hold_memory", 100)
        daemon.wait_for_children(2, 10, exclude={grown})
        assert client.call("echo", "after") == ["after"]
    assert f"worker {grown} asks to be replaced: its RSS" in daemon.log()


def test_a_preload_module_that_does_not_import_stops_the_master(make_daemon):
    daemon = make_daemon(start=False, processes=1, preload="json, no_such_library")
    daemon.start(wait=False)
    assert daemon.wait(15) == 3
    assert "cannot import module 'no_such_library' (listed in [worker] preload)" in daemon.log()
    good = make_daemon(processes=1, preload="json")
    with TaskClient([good.address]) as client:
        assert client.call("echo", 1) == [1]


def test_sigterm_while_a_worker_boots_reaches_its_graceful_handler(make_daemon, tmp_path):
    """The master forks with the worker's signals blocked: one that arrives while
    the worker boots is handled once it serves (a drain), not lost or fatal. The
    task module is imported by the worker (preload_tasks off), so it signals a
    booting worker, not the master."""
    marker = tmp_path / "terminated"
    daemon = make_daemon(start=False, processes=1, preload_tasks="false",
                         tasks="greentask.examples.basic, tests.self_term_tasks",
                         env={"GREENTASK_TEST_TERM_MARKER": str(marker)})
    daemon.start(wait=False)
    wait_until(lambda: marker.exists() and "draining" in daemon.log(), 15,
               f"the booting worker to drain\n{daemon.log()}")
    wait_until(lambda: daemon.log().count("serving") >= 2, 15, "a replacement to serve")
    assert "killed by signal" not in daemon.log()
    with TaskClient([daemon.address]) as client:
        assert client.call("echo", "after") == ["after"]
