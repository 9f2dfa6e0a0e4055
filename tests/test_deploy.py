"""Deployment recipes run for real: supervisord, the Dockerfile's commands, HAProxy."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import websocket

from greentask import TaskClient

from .conftest import (
    ROOT,
    children_of,
    free_port,
    pid_alive,
    port_open,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

BIN = Path(sys.executable).parent


def descendants(pid: int) -> list[int]:
    found = []
    for child in children_of(pid):
        found += [child, *descendants(child)]
    return found


def run_environment(tmp_path: Path, port: int, gateway_port: int) -> dict[str, str]:
    """scripts/run's environment for a test: its own ports (the mail catcher's too)
    and run directory."""
    (tmp_path / "run").mkdir(exist_ok=True)
    return {**os.environ, "GREENTASK_RUN_DIR": str(tmp_path / "run"),
            "GREENTASK_WORKER_BIND": f"127.0.0.1:{port}",
            "GREENTASK_GATEWAY_TASK_SERVERS": f"127.0.0.1:{port}",
            "GREENTASK_SMTP_PORT": str(free_port()),
            "GREENTASK_WORKER_METRICS_BIND": f"127.0.0.1:{free_port()}",
            "GREENTASK_GATEWAY_MAIL_CATCHER": f"127.0.0.1:{free_port()}",
            "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{gateway_port}"}


class Supervisord:
    """The shipped conf/supervisord.conf on free ports, stopped by pid in teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.port, self.gateway_port = free_port(), free_port()
        self.env = {**run_environment(tmp_path, self.port, self.gateway_port),
                    "GREENTASK_WORKER_PROCESSES": "2",
                    "GREENTASK_WORKER_GRACEFUL_TIMEOUT": "5",
                    "GREENTASK_GATEWAY_ALLOWED_ORIGINS": f"http://127.0.0.1:{self.gateway_port}"}
        self.proc = subprocess.Popen([str(BIN / "supervisord"), "-c", "conf/supervisord.conf"],
                                     cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT)

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "supervisorctl"), "-c", "conf/supervisord.conf", *args],
                              cwd=ROOT, env=self.env, capture_output=True, text=True,
                              timeout=60)

    def stop(self) -> None:
        pids = descendants(self.proc.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def supervisord(tmp_path):
    running = Supervisord(tmp_path)
    yield running
    running.stop()


def test_supervisord_runs_reloads_drains_and_shuts_down(supervisord):
    def all_running() -> bool:
        states = dict(line.split()[:2] for line in supervisord.ctl("status").stdout.splitlines()
                      if line.strip())
        return all(states.get(f"greentask-{name}") == "RUNNING"
                   for name in ("worker", "gateway", "mail"))
    wait_until(all_running, 60, "every program RUNNING")
    wait_until(lambda: port_open(supervisord.port) and port_open(supervisord.gateway_port), 30,
               "both ports")
    ws = websocket.create_connection(f"ws://127.0.0.1:{supervisord.gateway_port}/ws",
                                     timeout=20)
    ws.send("hello")
    assert ws.recv() == "task complete"
    ws.close()
    # The seed's scenario, out of the box: the shipped [smtp] is the mail catcher.
    with TaskClient([f"127.0.0.1:{supervisord.port}"], timeout=20) as client:
        assert client.call("send_bulk", [f"u{i}@example.org" for i in range(5)], "Hi",
                           "Hello.")["sent"] == 5
    with urllib.request.urlopen(f"http://127.0.0.1:{supervisord.gateway_port}/mailbox",
                                timeout=10) as mailbox:
        assert json.load(mailbox)["count"] == 5

    errors, done = [], []
    stop = threading.Event()
    with TaskClient([f"127.0.0.1:{supervisord.port}"], timeout=20) as client:
        def caller() -> None:
            while not stop.is_set():
                try:
                    done.append(client.call("echo", 1))
                except Exception as exc:  # counted: the test asserts there are none
                    errors.append(repr(exc))
        callers = [threading.Thread(target=caller) for _ in range(20)]
        for thread in callers:
            thread.start()
        time.sleep(1)
        assert supervisord.ctl("signal", "HUP", "greentask-worker").returncode == 0
        time.sleep(3)
        stop.set()
        for thread in callers:
            thread.join(30)
        assert errors == [] and len(done) > 100
        status = subprocess.run([str(BIN / "greentask"), "status"], env=supervisord.env,
                                capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert "generation 2" in status.stdout

        handles = [client.submit("sleep", 1) for _ in range(20)]
        time.sleep(0.3)
        stopped = supervisord.ctl("stop", "greentask-worker")
        assert "stopped" in stopped.stdout
        assert [handle.get(timeout=10) for handle in handles] == [1] * 20

    pids = descendants(supervisord.proc.pid)
    assert pids  # the gateway's master and workers
    assert "Shut down" in supervisord.ctl("shutdown").stdout
    assert supervisord.proc.wait(30) == 0
    wait_until(lambda: not any(pid_alive(pid) for pid in pids), 10, "no process left")


def dockerfile():
    from dockerfile_parse import DockerfileParser
    return DockerfileParser(path=str(ROOT / "Dockerfile"))


def instructions(parser, name: str) -> list[str]:
    return [i["value"] for i in parser.structure if i["instruction"] == name]


def test_dockerfile_matches_the_project():
    import json
    parser = dockerfile()
    setup_py = (ROOT / "setup.py").read_text()
    supported = re.findall(r"Programming Language :: Python :: (3\.\d+)", setup_py)
    assert supported == ["3.11", "3.12", "3.13"]
    # The image runs the oldest supported Python, whatever runs this test.
    assert parser.baseimage == f"python:{supported[0]}-slim"
    assert f'python_requires=">={supported[0]}"' in setup_py
    assert instructions(parser, "USER") == ["greentask"]
    assert instructions(parser, "EXPOSE")[0].split() == ["12345", "8080"]
    assert instructions(parser, "STOPSIGNAL") == ["SIGTERM"]
    assert json.loads(instructions(parser, "CMD")[0]) == [
        "python", "-m", "greentask.worker", "-c", "conf/worker.ini"]
    assert '"greentask", "call", "echo"' in instructions(parser, "HEALTHCHECK")[0]
    for value in instructions(parser, "COPY"):
        for source in value.split()[:-1]:
            assert (ROOT / source).exists(), source


def test_compose_file_runs_a_gateway_against_the_worker_service():
    import yaml
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    gateway = compose["services"]["gateway"]
    assert "greentask.ws:app" in gateway["command"]
    assert gateway["environment"]["GREENTASK_GATEWAY_TASK_SERVERS"] == "worker:12345"
    assert "worker" in compose["services"]
    # The mail tasks and the page's mailbox reach the mail catcher's service.
    mail = compose["services"]["mail"]
    assert "greentask.examples.mailcatcher" in mail["command"]
    smtp_port = mail["command"][mail["command"].index("--smtp") + 1].rsplit(":", 1)[1]
    assert compose["services"]["worker"]["environment"]["GREENTASK_SMTP_HOST"] == "mail"
    assert smtp_port == "2525"  # [smtp] port's default
    http_port = mail["command"][mail["command"].index("--http") + 1].rsplit(":", 1)[1]
    assert gateway["environment"]["GREENTASK_GATEWAY_MAIL_CATCHER"] == f"mail:{http_port}"


def test_the_dockerfile_install_and_start_commands_work_in_a_fresh_venv(tmp_path):
    """What the image runs, run here: the RUN's pip install, the CMD, the HEALTHCHECK."""
    import json
    import shlex
    import shutil
    parser = dockerfile()
    app = tmp_path / "app"
    app.mkdir()
    # What docker leaves out of the copied folders: the patterns for any depth
    # (compiled modules of this machine, caches).
    ignored = [line.removeprefix("**/").rstrip("/") for line in
               (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("**/")]
    assert "*.so" in ignored
    for value in instructions(parser, "COPY"):
        *sources, target = value.split()
        for source in sources:
            destination = app / target / Path(source).name if target.endswith("/") else \
                app / target
            if (ROOT / source).is_dir():
                shutil.copytree(ROOT / source, destination,
                                ignore=shutil.ignore_patterns(*ignored))
            else:
                shutil.copy(ROOT / source, destination)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.pop("PYTHONPATH", None)
    install = [part.strip() for part in instructions(parser, "RUN")[0].split("&&")
               if part.strip().startswith("pip install")]
    assert install == ["pip install --no-cache-dir ."]
    subprocess.run(shlex.split(install[0]), cwd=app, env=env, check=True, timeout=600,
                   capture_output=True)
    port = free_port()
    env.update(parser.envs)
    env["GREENTASK_WORKER_BIND"] = f"127.0.0.1:{port}"  # tests stay on loopback
    command = json.loads(instructions(parser, "CMD")[0])
    daemon = subprocess.Popen(command, cwd=app, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: port_open(port), 30, "the image's CMD to serve")
        healthcheck = instructions(parser, "HEALTHCHECK")[0].split("CMD", 1)[1]
        result = subprocess.run(json.loads(healthcheck), cwd=app, env=env,
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "[]"
    finally:
        children = children_of(daemon.pid)
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
        for pid in children:
            assert not pid_alive(pid)


class HAProxy:
    """The shipped conf/haproxy.cfg with its frontend and servers moved to free ports."""

    def __init__(self, tmp_path: Path, backends: list[str]) -> None:
        haproxy = "/usr/sbin/haproxy"
        assert os.path.exists(haproxy), "install Debian's haproxy (scripts/test does, as root)"
        self.port = free_port()
        lines = []
        for line in (ROOT / "conf" / "haproxy.cfg").read_text().splitlines():
            if line.strip().startswith("bind "):
                line = f"    bind 127.0.0.1:{self.port}"
            if line.strip().startswith("server "):
                if not backends:
                    continue
                line = f"    server task{len(backends)} {backends.pop()} check"
            lines.append(line)
        self.config = tmp_path / "haproxy.cfg"
        self.config.write_text("\n".join(lines) + "\n")
        self.log_path = tmp_path / "haproxy.log"
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([haproxy, "-db", "-f", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(lambda: port_open(self.port), 10, "haproxy")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)


#: Seconds each task of the batch a host dies in sleeps.
KILLED_BATCH_SLEEP = 2.0


def test_haproxy_spreads_calls_and_survives_a_dead_host(make_daemon, tmp_path):
    from greentask import WorkerLost
    daemons = [make_daemon() for _ in range(3)]
    proxy = HAProxy(tmp_path, [d.address for d in daemons])
    try:
        hosts = {pid: daemon for daemon in daemons for pid in daemon.children()}
        with TaskClient([f"127.0.0.1:{proxy.port}"], connections_per_server=9,
                        timeout=30) as probe:
            def every_host_serves() -> bool:
                answered = {hosts.get(probe.call("pid")) for _ in range(30)}
                return "DOWN" not in proxy.log() and len(answered) == len(daemons)
            wait_until(every_host_serves, 30, "haproxy to send calls to every host")
        victim = daemons[1]
        outcomes = {True: [], False: []}
        served_by = set()
        with TaskClient([f"127.0.0.1:{proxy.port}"], connections_per_server=9,
                        timeout=30) as client:
            for batch in range(10):
                # The batch the host dies in runs long tasks, so the kill lands
                # while they run however slow the machine is.
                seconds = KILLED_BATCH_SLEEP if batch == 5 else 0.02
                handles = [(i % 2 == 0, client.submit("sleep", seconds, retry=i % 2 == 0))
                           for i in range(500)]
                if batch == 5:  # kill one host while its share of the batch runs
                    wait_until(lambda: victim.inflight() >= 20, 20,
                               "the host to be killed to run its share of the batch")
                    for pid in [victim.pid, *victim.children()]:
                        os.kill(pid, signal.SIGKILL)
                for retry, handle in handles:
                    try:
                        outcomes[retry].append(handle.get(timeout=30))
                    except WorkerLost:
                        outcomes[retry].append("lost")
                if batch == 0:
                    served_by |= {client.call("pid") for _ in range(60)}
        assert len(outcomes[True]) + len(outcomes[False]) == 5000
        # retry=True: every call succeeded, on another host if its own died.
        assert outcomes[True] == [0.02] * 1250 + [KILLED_BATCH_SLEEP] * 250 + [0.02] * 1000
        # retry=False: nothing was lost before the kill, the killed host's running
        # tasks were, and no call failed any other way.
        assert set(outcomes[False][:1250]) == {0.02}
        assert "lost" in outcomes[False][1250:1500]
        assert set(outcomes[False][1250:]) <= {0.02, KILLED_BATCH_SLEEP, "lost"}
        assert len(served_by) >= 3  # children of more than one host answered
        wait_until(lambda: "is DOWN" in proxy.log(), 5, "haproxy to mark the host down")
        assert "task" in proxy.log()
    finally:
        proxy.stop()


def test_scripts_run_starts_everything_and_its_stop_command_works(tmp_path):
    """What the README tells a new user: scripts/run, a call, then the stop
    command it prints, typed in another shell (without its environment)."""
    port, gateway_port = free_port(), free_port()
    env = run_environment(tmp_path, port, gateway_port)
    banner = tmp_path / "banner"
    with open(banner, "wb") as out:
        proc = subprocess.Popen(["scripts/run"], cwd=ROOT, env=env, stdout=out, stderr=out)
    try:
        wait_until(lambda: port_open(port) and port_open(gateway_port), 90,
                   f"scripts/run to serve\n{banner.read_text()}")
        call = subprocess.run([str(BIN / "greentask"), "call", "echo", '{"x": 1}'],
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
        assert call.stdout.strip() == '{"x":1}', call.stderr
        # The dashboard works out of the box: the gateway reads the daemon's status port.
        def dashboard() -> list:
            url = f"http://127.0.0.1:{gateway_port}/dashboard/status"
            with urllib.request.urlopen(url, timeout=10) as reply:
                servers = json.loads(reply.read())["servers"]
            return [s for s in servers if s["ok"] and len(s["status"]["workers"]) >= 1]
        shown = wait_until(dashboard, 30, "the dashboard to show the task daemon")
        assert shown[0]["address"] == env["GREENTASK_WORKER_METRICS_BIND"]
        lines = banner.read_text().splitlines()
        stop_command = lines[lines.index("Stop with Ctrl-C, or:") + 1].strip()
        clean_env = {k: v for k, v in os.environ.items() if not k.startswith("GREENTASK_")}
        stopped = subprocess.run(["bash", "-c", stop_command], cwd=ROOT, env=clean_env,
                                 capture_output=True, text=True, timeout=60)
        assert "Shut down" in stopped.stdout, stopped.stderr
        assert proc.wait(60) == 0
    finally:
        pids = descendants(proc.pid)
        if proc.poll() is None:
            proc.kill()
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_scripts_run_names_the_program_that_holds_its_port(tmp_path):
    port, gateway_port = free_port(), free_port()
    holder = subprocess.Popen([sys.executable, "-c", "import socket, time; s = socket.socket(); "
                               f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)"])
    try:
        wait_until(lambda: port_open(port), 10, "the port holder to listen")
        result = subprocess.run(["scripts/run"], cwd=ROOT, capture_output=True, text=True,
                                env=run_environment(tmp_path, port, gateway_port), timeout=120)
        assert result.returncode == 1
        assert f"the task port 127.0.0.1:{port} is in use by pid {holder.pid}: " \
               f"{sys.executable} -c import socket" in result.stderr
        assert "GREENTASK_WORKER_BIND" in result.stderr
        assert not (tmp_path / "run" / "supervisord.pid").exists()  # nothing was started
    finally:
        holder.kill()
        holder.wait(5)


def test_a_program_that_gives_up_has_its_last_log_lines_shown(tmp_path):
    # The shipped event listener, in a supervisord whose program fails at once
    # (a shell, so even a loaded machine fails it within startsecs: a real
    # worker can take longer than that to import and fail, and be restarted).
    shipped = (ROOT / "conf" / "supervisord.conf").read_text()
    listener = shipped[shipped.index("[eventlistener:greentask-fatal]"):].replace(
        "%(here)s/..", str(ROOT))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = tmp_path / "supervisord.conf"
    config.write_text(f"""[supervisord]
nodaemon = true
logfile = {run_dir}/supervisord.log
pidfile = {run_dir}/supervisord.pid

[program:greentask-worker]
command = sh -c 'echo "the cause: no_such_task_module does not import"; exit 3'
startsecs = 10
startretries = 1
redirect_stderr = true
stdout_logfile = {run_dir}/worker.log

{listener}""")
    banner = tmp_path / "banner"
    with open(banner, "wb") as out:
        proc = subprocess.Popen([str(BIN / "supervisord"), "-c", str(config)], cwd=ROOT,
                                env={**os.environ, "GREENTASK_RUN_DIR": str(run_dir)},
                                stdout=out, stderr=out)
    try:
        wait_until(lambda: "greentask-worker gave up after failing to start" in
                   banner.read_text(), 60, f"the FATAL report\n{banner.read_text()}")
        report = banner.read_text().split("greentask-worker gave up after failing to start")[1]
        assert f"the last lines of {run_dir}/worker.log:" in report
        assert "the cause: no_such_task_module does not import" in report
    finally:
        pids = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        for pid in pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
