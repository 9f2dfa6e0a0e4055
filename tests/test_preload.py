"""Task code imported by the master before the fork ([worker] preload_tasks), and reloads."""

from __future__ import annotations

import os
import signal
import time

import pytest

from greentask import TaskClient

from .conftest import free_port, wait_until
from .test_control import greentask, scrape

pytestmark = pytest.mark.timeout(60)


def imports_logged(path) -> list[int]:
    return [int(line) for line in path.read_text().split()] if path.exists() else []


@pytest.mark.parametrize("preload_tasks", ["true", "false"])
def test_who_imports_the_task_modules(make_daemon, tmp_path, preload_tasks):
    record = tmp_path / "imports"
    daemon = make_daemon(processes=2, preload_tasks=preload_tasks,
                         tasks="greentask.examples.basic, tests.import_probe_tasks",
                         env={"GREENTASK_TEST_IMPORT_LOG": str(record)})
    with TaskClient([daemon.address]) as client:
        assert client.call("take_lock") == "taken"
    if preload_tasks == "true":
        assert imports_logged(record) == [daemon.pid]  # once, shared by both workers
    else:
        assert sorted(imports_logged(record)) == sorted(daemon.children())
    old = set(daemon.children())
    daemon.signal(signal.SIGHUP)
    new = daemon.wait_for_children(2, 15, exclude=old)
    expected = [daemon.pid] * 2 if preload_tasks == "true" else sorted(old) + sorted(new)
    wait_until(lambda: sorted(imports_logged(record)) == sorted(expected), 10,
               f"imports by {expected}, got {imports_logged(record)}")


def test_a_lock_made_when_the_master_imports_a_task_module_is_gevents(make_daemon):
    """The master patches before importing task code: a lock made at import
    time waits cooperatively in the worker, so other tasks go on meanwhile."""
    daemon = make_daemon(processes=1, tasks="greentask.examples.basic, tests.import_probe_tasks")
    with TaskClient([daemon.address], timeout=10) as client:
        holder = client.submit("hold_lock", 1.0)
        time.sleep(0.2)
        taker = client.submit("take_lock")
        started = time.monotonic()
        assert client.call("echo", "meanwhile") == ["meanwhile"]
        assert time.monotonic() - started < 0.5
        assert holder.get() == "released"
        assert taker.get() == "taken"


def write_helper(directory, version: int) -> None:
    (directory / "helper_of_tasks.py").write_text(f"VERSION = {version}\n")


@pytest.mark.parametrize("preload_tasks", ["true", "false"])
def test_reload_serves_a_changed_helper_module(make_daemon, tmp_path, preload_tasks):
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "tasks_with_helper.py").write_text(
        "import helper_of_tasks\nfrom greentask import task\n\n\n"
        "@task\ndef helper_version():\n    return helper_of_tasks.VERSION\n")
    write_helper(modules, 1)
    daemon = make_daemon(preload_tasks=preload_tasks, tasks="tasks_with_helper",
                         env={"PYTHONPATH": str(modules)})
    with TaskClient([daemon.address]) as client:
        assert client.call("helper_version") == 1
        time.sleep(1.1)  # a new mtime, so the cached bytecode is not reused
        write_helper(modules, 2)
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: client.call("helper_version") == 2, 15, "the new helper")


def test_a_failed_reload_keeps_the_old_code_and_the_next_one_works(make_daemon, tmp_path):
    modules = tmp_path / "modules"
    modules.mkdir()
    write_helper(modules, 1)
    tasks = modules / "tasks_with_helper.py"
    tasks.write_text("import helper_of_tasks\nfrom greentask import task\n\n\n"
                     "@task\ndef helper_version():\n    return helper_of_tasks.VERSION\n")
    daemon = make_daemon(tasks="tasks_with_helper", env={"PYTHONPATH": str(modules)})
    children = daemon.children()
    source = tasks.read_text()
    tasks.write_text(source + "raise RuntimeError('half-written file')\n")
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in daemon.log(), 10, "the failed reload")
    assert "RuntimeError: half-written file" in daemon.log()
    assert "generation 1 keeps serving" in daemon.log()
    with TaskClient([daemon.address]) as client:
        assert client.call("helper_version") == 1
        assert sorted(daemon.children()) == sorted(children)
        time.sleep(1.1)
        tasks.write_text(source)
        write_helper(modules, 3)
        daemon.signal(signal.SIGHUP)
        wait_until(lambda: client.call("helper_version") == 3, 15, "the fixed code")


def test_the_master_has_one_thread_and_no_event_loop(make_daemon):
    """The master is patched but keeps the operating system's sockets, select,
    getaddrinfo and fork: binding, control commands, metrics and reloads never
    start a gevent hub (whose libev loop holds an epoll descriptor) or gevent's
    resolver thread in it. Its workers do have one."""
    metrics_port = free_port()
    daemon = make_daemon(metrics_bind=f"127.0.0.1:{metrics_port}")
    assert greentask("status", "-c", str(daemon.config)).returncode == 0
    assert scrape(metrics_port)
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: daemon.log().count("serving") >= 4, 15, "the reload")
    assert greentask("status", "-c", str(daemon.config)).returncode == 0

    def epoll_descriptors(pid: int) -> list[str]:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        return [link for link in links if "eventpoll" in link]

    assert os.listdir(f"/proc/{daemon.pid}/task") == [str(daemon.pid)]
    assert epoll_descriptors(daemon.pid) == []
    assert all(epoll_descriptors(child) for child in daemon.children())


def test_turning_preload_tasks_off_on_reload_hands_the_import_to_the_workers(make_daemon,
                                                                            tmp_path):
    record = tmp_path / "imports"
    daemon = make_daemon(tasks="greentask.examples.basic, tests.import_probe_tasks",
                         env={"GREENTASK_TEST_IMPORT_LOG": str(record)})
    assert imports_logged(record) == [daemon.pid]
    old = set(daemon.children())
    daemon.config.write_text(daemon.config.read_text().replace(
        "[worker]\n", "[worker]\npreload_tasks = false\n", 1))
    daemon.signal(signal.SIGHUP)
    new = daemon.wait_for_children(2, 15, exclude=old)
    wait_until(lambda: sorted(imports_logged(record)) == sorted([daemon.pid, *new]), 10,
               f"imports by the new workers, got {imports_logged(record)}")
    with TaskClient([daemon.address]) as client:
        assert client.call("take_lock") == "taken"


def test_a_worker_replaced_after_a_failed_reload_runs_the_old_code(make_daemon, tmp_path):
    """The new generation fails in the workers (preload_tasks turned off, so
    they import the broken file); the master must also put back the code it
    had, or the next replacement of an old worker runs, or fails on, the new."""
    modules = tmp_path / "modules"
    modules.mkdir()
    write_helper(modules, 1)
    tasks = modules / "tasks_with_helper.py"
    source = ("import helper_of_tasks\nfrom greentask import task\n\n\n"
              "@task\ndef helper_version():\n    return helper_of_tasks.VERSION\n")
    tasks.write_text(source)
    daemon = make_daemon(tasks="tasks_with_helper", env={"PYTHONPATH": str(modules)})
    old = daemon.children()
    time.sleep(1.1)  # a new mtime, so the cached bytecode is not reused
    tasks.write_text(source + "raise RuntimeError('half-written file')\n")
    daemon.config.write_text(daemon.config.read_text().replace(
        "[worker]\n", "[worker]\npreload_tasks = false\n", 1))
    daemon.signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in daemon.log(), 15, "the failed reload")
    os.kill(old[0], signal.SIGKILL)
    replacement = daemon.wait_for_children(2, 15, exclude={old[0]})
    with TaskClient([daemon.address]) as client:
        for _ in range(10):
            assert client.call("helper_version") == 1
    assert daemon.proc.poll() is None
    assert old[1] in replacement
