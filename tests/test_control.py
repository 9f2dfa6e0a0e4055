"""Operating a running daemon: status, reload, stop, scale, pidfile, log files, user."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import ujson

from greentask import TaskClient, TaskError

from .conftest import ROOT, free_port, wait_until

pytestmark = pytest.mark.timeout(60)

GREENTASK = str(Path(sys.executable).with_name("greentask"))


def greentask(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([GREENTASK, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30)


def test_status_shows_every_worker_and_counters_that_move(daemon):
    result = greentask("status", "-c", str(daemon.config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"greentask master [greentask] pid {daemon.pid}, listening at "
                               f"{daemon.address}, generation 1, 2 worker processes wanted")
    assert lines[1].split() == ["pid", "gen", "state", "rss", "conns", "inflight", "done",
                                "failed", "timeouts", "tasks/s", "uptime"]
    assert sorted(int(line.split()[0]) for line in lines[2:]) == sorted(daemon.children())
    with TaskClient([daemon.address]) as client:
        for i in range(30):
            client.call("echo", i)
        with pytest.raises(TaskError):
            client.call("fail")
        busy = client.submit("sleep", 2)
        wait_until(lambda: daemon.inflight() == 1, 10, "the sleep to run")
        status = ujson.loads(greentask("status", "-c", str(daemon.config), "--json").stdout)
        assert busy.get() == 2
    workers = status["workers"]
    assert sum(w["done"] for w in workers) == 30
    assert sum(w["failed"] for w in workers) == 1
    assert sum(w["inflight"] for w in workers) == 1
    assert all(w["state"] == "ready" and w["rss"] > 1_000_000 for w in workers)
    assert all(w["heartbeat_age"] < 2 for w in workers)


def test_reload_scale_and_stop_report_what_happened_once_it_has(daemon):
    before = set(daemon.children())
    result = greentask("reload", "-c", str(daemon.config))
    assert (result.returncode, result.stdout.strip()) == \
        (0, "reloaded: generation 2 serves with 2 worker processes"), result.stderr
    status = daemon.status()
    serving = {w["pid"] for w in status["workers"] if not w["retiring"]}
    assert len(serving) == 2 and not serving & before  # done when it says so, no wait
    assert status["master"]["reload"] == {"number": 1, "state": "serving", "generation": 2,
                                          "error": None}
    result = greentask("scale", "3", "-c", str(daemon.config))
    assert (result.returncode, result.stdout.strip()) == \
        (0, "scaled to 3 worker processes, all serving"), result.stderr
    assert sum(w["state"] == "ready" for w in daemon.status()["workers"]) == 3
    result = greentask("scale", "0", "-c", str(daemon.config))
    assert result.returncode == 2 and "at least 1" in result.stderr
    result = greentask("stop", "-c", str(daemon.config))
    assert (result.returncode, result.stdout.strip()) == (0, "stopped"), result.stderr
    assert daemon.wait(5) == 0


def test_a_reload_that_fails_says_why_and_exits_1(make_daemon, tmp_path):
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "mine.py").write_text("from greentask import task\n\n\n@task\n"
                                     "def mine():\n    return 1\n")
    daemon = make_daemon(tasks="greentask.examples.basic, mine",
                         env={"PYTHONPATH": str(modules)})
    (modules / "mine.py").write_text("def broken(:\n")
    result = greentask("reload", "-c", str(daemon.config))
    assert result.returncode == 1
    assert result.stderr.startswith("error: reload failed: the task code does not load: ")
    assert "SyntaxError" in result.stderr, result.stderr
    with TaskClient([daemon.address]) as client:
        assert client.call("mine") == 1  # generation 1 serves on
    path = daemon.status()["master"]["control_socket"]
    daemon.config.write_text(daemon.config.read_text().replace(
        "[worker]\n", "[worker]\nconcurrency = many\n", 1))
    result = greentask("reload", "-c", str(daemon.config))
    assert result.returncode == 2 and "concurrency = 'many'" in result.stderr  # not sent
    result = greentask("reload", "--socket", path)  # sent: the master refuses it
    assert result.returncode == 1
    assert "reload failed: the config does not load: " in result.stderr
    assert "concurrency = 'many'" in result.stderr


def test_scale_is_refused_above_max_processes_and_nothing_changes(make_daemon):
    daemon = make_daemon(max_processes=3)
    result = greentask("scale", "1000", "-c", str(daemon.config))
    assert result.returncode == 1
    assert "scale 1000: more than [worker] max_processes = 3; nothing changed" in result.stderr
    assert daemon.status()["master"]["processes"] == 2
    assert greentask("scale", "3", "-c", str(daemon.config)).returncode == 0
    daemon.signal(signal.SIGTTIN)
    wait_until(lambda: "already at [worker] max_processes = 3" in daemon.log(), 10,
               "SIGTTIN to be refused")
    assert daemon.status()["master"]["processes"] == 3


def test_processes_above_max_processes_stop_the_start_with_2(make_daemon):
    daemon = make_daemon(start=False, processes=4, max_processes=3)
    daemon.start(wait=False)
    assert daemon.wait(15) == 2
    assert "[worker] processes = 4 is more than [worker] max_processes = 3" in daemon.log()


def test_control_commands_find_a_daemon_started_with_bind(make_daemon, tmp_path):
    daemon = make_daemon(start=False)
    config_port = daemon.port
    daemon.port = free_port()
    daemon.proc = subprocess.Popen(
        [sys.executable, "-m", "greentask.worker", "-c", str(daemon.config), "--bind",
         daemon.address], cwd=ROOT, stdout=open(daemon.log_path, "wb"),
        stderr=subprocess.STDOUT, env=daemon.env)
    wait_until(lambda: daemon.log().count("serving") == 2, 15, "the daemon to serve")
    result = greentask("status", "-c", str(daemon.config))
    assert result.returncode == 1 and "--bind" in result.stderr
    result = greentask("status", "-c", str(daemon.config), "--bind", daemon.address)
    assert result.returncode == 0 and f"listening at {daemon.address}" in result.stdout
    assert config_port != daemon.port


def test_scale_refuses_nonsense(daemon):
    from greentask.config import control_socket_path, load
    from greentask.daemon.control import ControlError, send_command
    path = control_socket_path(load(str(daemon.config)))
    with pytest.raises(ControlError, match="at least 1"):
        send_command(path, "scale", processes=0)
    with pytest.raises(ControlError, match="unknown command 'restart'"):
        send_command(path, "restart")


def test_control_socket_is_private_and_removed_at_exit(make_daemon, tmp_path):
    pidfile = tmp_path / "gt.pid"
    daemon = make_daemon(pidfile=pidfile)
    assert int(pidfile.read_text()) == daemon.pid
    sock = Path(f"{pidfile}.sock")
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0
    assert not pidfile.exists() and not sock.exists()


def test_a_second_master_with_the_same_pidfile_refuses_to_start(make_daemon, tmp_path):
    pidfile = tmp_path / "gt.pid"
    make_daemon(pidfile=pidfile)
    second = make_daemon(start=False, pidfile=pidfile)
    second.start(wait=False)
    assert second.wait(15) == 2
    assert "is greentask already started?" in second.log()


def test_status_without_a_daemon_says_what_to_do(tmp_path):
    config = tmp_path / "w.ini"
    config.write_text(f"[worker]\ncontrol_socket = {tmp_path}/nothing.sock\n")
    result = greentask("status", "-c", str(config))
    assert result.returncode == 1
    assert "no greentask master answers" in result.stderr and "scripts/run" in result.stderr


def test_usr1_reopens_the_log_file_after_rotation(make_daemon, tmp_path):
    logfile = tmp_path / "greentask.log"
    daemon = make_daemon(start=False, logfile=logfile)
    daemon.start(wait=False)
    wait_until(lambda: logfile.exists() and logfile.read_text().count("serving") == 2, 15,
               "workers to log to the file")
    logfile.rename(tmp_path / "greentask.log.1")
    daemon.signal(signal.SIGUSR1)
    wait_until(logfile.exists, 5, "a new log file")
    with TaskClient([daemon.address]) as client:
        for _ in range(2):  # a worker logs each failed task
            with pytest.raises(TaskError):
                client.call("fail", "after rotation")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(15) == 0
    text = logfile.read_text()
    assert "log files reopened" in text and "exits with status 0" in text
    assert "RuntimeError: after rotation" in text


@pytest.mark.skipif(os.geteuid() != 0, reason="switching user needs root")
def test_workers_run_as_the_configured_user(make_daemon):
    daemon = make_daemon(start=False, user="nobody", group="nogroup")
    daemon.start(wait=False)
    outcome = wait_until(lambda: daemon.proc.poll() is not None or
                         daemon.log().count("serving") == 2, 20, "the workers to start or fail")
    if daemon.proc.poll() is None:
        for pid in daemon.children():
            with open(f"/proc/{pid}/status") as status:
                uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
            assert uids == ["65534"] * 4
        assert os.stat(f"/proc/{daemon.pid}").st_uid == 0  # the master stays root
        with TaskClient([daemon.address]) as client:
            assert client.call("echo", "as nobody") == ["as nobody"]
    else:
        # Where Python or this checkout is not readable by nobody, the workers
        # cannot import their tasks once switched: the master says so and stops.
        assert outcome and daemon.wait(5) == 3
        assert "cannot import task module" in daemon.log()


def scrape(port: int, path: str = "/metrics") -> dict[tuple[str, tuple], float]:
    import urllib.error
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def tasks_total(function: str, outcome: str) -> tuple[str, tuple]:
    return ("greentask_tasks_total", (("function", function), ("outcome", outcome)))


def test_metrics_agree_with_status_and_survive_a_dead_worker(make_daemon):
    import urllib.error
    import urllib.request

    from greentask import TaskTimeout

    from .conftest import free_port
    port = free_port()
    daemon = make_daemon(metrics_bind=f"127.0.0.1:{port}")
    fresh = scrape(port)  # before any task and any restart: every series is there, at 0
    for outcome in ("ok", "failed", "timeout"):
        assert fresh[tasks_total("send_bulk", outcome)] == 0
    from greentask.daemon.census import RESTART_CAUSES
    assert {cause: fresh[("greentask_worker_restarts_total", (("cause", cause),))]
            for cause in RESTART_CAUSES} == dict.fromkeys(RESTART_CAUSES, 0)
    with TaskClient([daemon.address]) as client:
        for i in range(10):
            client.call("echo", i)
        for _ in range(2):
            with pytest.raises(TaskError):
                client.call("fail")
        with pytest.raises(TaskTimeout):
            client.call("sleep", 5, timeout=0.1)
        metrics = scrape(port)
        status = ujson.loads(greentask("status", "-c", str(daemon.config), "--json").stdout)
        # The same reply over HTTP, beside /metrics, for dashboards on other hosts.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=10) as reply:
            assert reply.headers["Content-Type"] == "application/json"
            served = ujson.loads(reply.read())
        assert [(w["pid"], w["done"], w["failed"]) for w in served["workers"]] == \
            [(w["pid"], w["done"], w["failed"]) for w in status["workers"]]
        assert served["master"]["pid"] == status["master"]["pid"] == daemon.pid
        done = sum(w["done"] for w in status["workers"])
        by_outcome = {outcome: sum(value for (name, labels), value in metrics.items()
                                   if name == "greentask_tasks_total"
                                   and dict(labels)["outcome"] == outcome)
                      for outcome in ("ok", "failed", "timeout")}
        assert by_outcome == {"ok": done, "failed": 2, "timeout": 1} and done == 10
        assert metrics[tasks_total("echo", "ok")] == 10
        assert metrics[tasks_total("fail", "failed")] == 2
        assert metrics[tasks_total("sleep", "timeout")] == 1
        assert metrics[tasks_total("sleep", "ok")] == 0
        assert metrics[("greentask_task_duration_seconds_count", ())] == 13
        assert metrics[("greentask_task_duration_seconds_bucket", (("le", "0.005"),))] >= 10
        assert metrics[("greentask_workers", ())] == 2
        victim = daemon.children()[0]
        os.kill(victim, signal.SIGKILL)
        daemon.wait_for_children(2, 10, exclude={victim})
        client.call("echo", "after")
    after = scrape(port)
    assert after[tasks_total("echo", "ok")] == 11  # never backwards
    assert after[("greentask_worker_restarts_total", (("cause", "crash"),))] == 1
    with pytest.raises(urllib.error.HTTPError) as info:
        scrape(port, "/other")
    assert info.value.code == 404


def test_a_flood_of_connections_to_the_metrics_port_cannot_stop_the_master(make_daemon):
    import socket as socket_module

    from .conftest import free_port, pid_alive
    port = free_port()
    daemon = make_daemon(metrics_bind=f"127.0.0.1:{port}")
    workers = set(daemon.children())
    flood = []
    try:
        # More than select() can watch (descriptors past 1023), none sending a byte.
        for _ in range(1100):
            sock = socket_module.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            flood.append(sock)
        wait_until(lambda: greentask("status", "-c", str(daemon.config)).returncode == 0, 20,
                   "the control socket to answer during the flood")
    finally:
        for sock in flood:
            sock.close()
    assert pid_alive(daemon.pid) and set(daemon.children()) == workers
    metrics = wait_until(lambda: _scrape_or_none(port), 30, "a scrape after the flood")
    assert metrics[("greentask_workers", ())] == 2
    with TaskClient([daemon.address]) as client:
        assert client.call("echo", "still") == ["still"]
    assert "Traceback" not in daemon.log()


def _scrape_or_none(port: int) -> dict | None:
    try:
        return scrape(port)
    except OSError:
        return None


def test_a_big_scale_up_is_forked_in_batches_and_reported_once_done(make_daemon):
    from greentask.daemon.master import FORKS_PER_PASS
    daemon = make_daemon(processes=1, max_processes=2 * FORKS_PER_PASS + 2)
    wanted = 2 * FORKS_PER_PASS + 2
    result = greentask("scale", str(wanted), "-c", str(daemon.config), "--timeout", "60")
    assert (result.returncode, result.stdout.strip()) == \
        (0, f"scaled to {wanted} worker processes, all serving"), result.stderr
    result = greentask("scale", "1", "-c", str(daemon.config))
    assert (result.returncode, result.stdout.strip()) == \
        (0, "scaled to 1 worker process, all serving"), result.stderr


def test_outcomes_read_from_status_replies():
    from greentask.daemon.outcomes import reload_outcome, scale_outcome, timed_out

    def status(reload_number, state, workers, error=None):
        return {"master": {"generation": 2, "processes": 2,
                           "reload": {"number": reload_number, "state": state,
                                      "generation": 2, "error": error}},
                "workers": [{"state": s, "retiring": r, "inflight": 1} for s, r in workers]}

    before = status(0, "none", [("ready", False)] * 2)
    assert reload_outcome(before, before) is None  # the HUP is not handled yet
    assert reload_outcome(before, status(1, "in progress", [("booting", False)] * 2)) is None
    assert reload_outcome(before, status(1, "serving", [("ready", False)] * 2 +
                                         [("draining", True)])).message == \
        "reloaded: generation 2 serves with 2 worker processes"
    failed = reload_outcome(before, status(1, "failed", [("ready", False)], "it broke"))
    assert (failed.ok, failed.message) == (False, "reload failed: it broke")
    assert scale_outcome(3, status(0, "none", [("ready", False)] * 2 +
                                   [("booting", False)])) is None
    assert scale_outcome(2, status(0, "none", [("ready", False)] * 3)) is None
    assert scale_outcome(2, status(0, "none", [("ready", False)] * 2 + [("draining", True)]))
    assert timed_out("stop", status(0, "none", [("draining", True)] * 2), 5).message == \
        "the master is still stopping after 5 s: 2 task(s) in flight, which it lets finish " \
        "within [worker] graceful_timeout"
    assert "1 of 2 worker processes serve" in timed_out(
        "reload", status(1, "in progress", [("ready", False), ("booting", False)]), 60).message


@pytest.mark.parametrize("preload_tasks", ["true", "false"])
def test_the_start_lines_name_every_address_and_the_task_modules(make_daemon, preload_tasks):
    metrics_port = free_port()
    daemon = make_daemon(processes=1, metrics_bind=f"127.0.0.1:{metrics_port}",
                         preload_tasks=preload_tasks)
    log = daemon.log()
    path = daemon.status()["master"]["control_socket"]
    assert f"master {daemon.pid} listening at {daemon.address} with 1 worker process; " \
           f"control socket {path}; metrics at http://127.0.0.1:{metrics_port}/metrics" in log
    modules = "greentask.examples.basic, greentask.examples.mail, tests.tasks_for_tests"
    if preload_tasks == "true":
        assert f"task modules {modules}: " in log
        assert re.search(r": \d+ tasks \(bad_progress, .*echo, ", log)
    else:
        assert f"task modules {modules}: each worker imports them (preload_tasks = false)" in log


def test_a_command_the_master_is_slow_to_answer_is_judged_by_its_outcome(daemon):
    # The master stopped (as if busy forking): the command waits in the socket's
    # queue and is not answered in time, yet it is carried out once the master
    # runs again; the command line must say what happened, not "timed out".
    daemon.signal(signal.SIGSTOP)
    try:
        scale = subprocess.Popen([GREENTASK, "scale", "3", "-c", str(daemon.config),
                                  "--timeout", "60"], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        note = scale.stderr.readline()  # blocks until the CLI has given up on the answer
        assert note.startswith("note: the master at ") and "did not answer within 5 s" in note
    finally:
        daemon.signal(signal.SIGCONT)
    out, err = scale.communicate(timeout=90)
    assert (scale.returncode, out.strip()) == (0, "scaled to 3 worker processes, all serving"), err
