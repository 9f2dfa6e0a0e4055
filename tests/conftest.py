"""Shared fixtures: real daemons on free loopback ports, raw line sockets, bounded waits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import ujson
import websocket

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``predicate`` until it returns something true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def children_of(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def stop_process(proc: subprocess.Popen, signum: int = signal.SIGTERM, timeout: float = 10,
                 ) -> None:
    """Stop ``proc`` with ``signum``, killing it if it has not exited within ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signum)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def write_config(path: Path, worker: dict[str, object] | None = None,
                 smtp: dict[str, object] | None = None) -> Path:
    """An INI file with the given [worker] keys, and [smtp] ones (the mail example's section)."""
    lines = ["[worker]"] + [f"{k} = {v}" for k, v in (worker or {}).items()]
    if smtp:
        lines += ["[smtp]"] + [f"{k} = {v}" for k, v in smtp.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Daemon:
    """``python -m greentask.worker`` in a real process, stopped by pid in teardown."""

    def __init__(self, tmp_path: Path, processes: int = 2, env: dict[str, str] | None = None,
                 **worker: object) -> None:
        self.port = free_port()
        self.env = {**os.environ, **(env or {})}
        self.processes = processes
        settings = {"bind": f"127.0.0.1:{self.port}", "processes": processes,
                    "tasks": "greentask.examples.basic, greentask.examples.mail, "
                             "tests.tasks_for_tests",
                    "graceful_timeout": 10, "loglevel": "info"}
        settings.update(worker)
        self.smtp = settings.pop("smtp", None)
        self.config = write_config(tmp_path / f"worker-{self.port}.ini", settings, self.smtp)
        self.log_path = tmp_path / f"worker-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> Daemon:
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([PYTHON, "-m", "greentask.worker", "-c", str(self.config)],
                                     cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     env=self.env)
        log.close()
        if wait:
            wait_until(lambda: port_open(self.port) and len(self.children()) == self.processes
                       and self.log().count("serving") >= self.processes, 15,
                       f"daemon on port {self.port} to serve\n{self.log()}")
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def children(self) -> list[int]:
        return children_of(self.pid)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait_for_children(self, count: int, timeout: float, exclude: set[int] = frozenset(),
                          ) -> list[int]:
        """Wait until ``count`` children serve, none of them in ``exclude``."""
        def settled() -> list[int] | None:
            children = self.children()
            ok = len(children) == count and not exclude & set(children)
            return children if ok else None
        return wait_until(settled, timeout, f"{count} children (not {sorted(exclude)})")  # type: ignore[return-value]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict:
        """The master's answer to ``status`` (what ``greentask status --json`` prints)."""
        from greentask.config import control_socket_path, load
        from greentask.daemon.control import send_command
        return send_command(control_socket_path(load(str(self.config))), "status", timeout=30)

    def inflight(self) -> int:
        """Tasks running now over all workers, from ``greentask status``."""
        return sum(w["inflight"] for w in self.status()["workers"])

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Kill the master and every child by pid (teardown)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        children = self.children()
        self.proc.send_signal(signal.SIGQUIT)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for pid in children:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start daemons on free ports; every one is stopped by pid afterwards."""
    started: list[Daemon] = []

    def make(start: bool = True, **kwargs: object) -> Daemon:
        daemon = Daemon(tmp_path, **kwargs)
        started.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in started:
        daemon.stop()


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    """A running daemon with two workers."""
    return make_daemon()


class LineSocket:
    """A raw client: send bytes, read reply lines, with a timeout on every wait."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def send_json(self, obj: object) -> None:
        self.send(ujson.dumps(obj) + "\n")

    def read_line(self) -> bytes:
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError(f"connection closed; unread: {self.buffer[:200]!r}")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line

    def read_json(self) -> dict:
        return ujson.loads(self.read_line())

    def call(self, obj: object) -> dict:
        self.send_json(obj)
        return self.read_json()

    def at_eof(self) -> bool:
        data = self.sock.recv(1)
        return data == b""

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def connect() -> Iterator[Callable[..., LineSocket]]:
    sockets: list[LineSocket] = []

    def make(port: int, timeout: float = 10.0) -> LineSocket:
        sock = LineSocket(port, timeout)
        sockets.append(sock)
        return sock

    yield make
    for sock in sockets:
        sock.close()


GUNICORN = str(Path(sys.executable).with_name("gunicorn"))
WORKER_CLASS = "geventwebsocket.gunicorn.workers.GeventWebSocketWorker"


class Gateway:
    """gunicorn with the design card's -k command line, stopped by pid in teardown."""

    def __init__(self, tmp_path: Path, task_servers: str, use_conf_file: bool = False,
                 workers: int = 1, gunicorn_args: tuple[str, ...] = (),
                 **settings: object) -> None:
        self.port = free_port()
        # Like an operator: the origin its pages are served from.
        settings.setdefault("allowed_origins", f"http://127.0.0.1:{self.port}")
        # The demo page polls /mailbox: only where a test starts a mail catcher.
        settings.setdefault("mail_catcher", "none")
        lines = ["[gateway]", f"task_servers = {task_servers}"]
        lines += [f"{key} = {value}" for key, value in settings.items()]
        self.config = tmp_path / f"gateway-{self.port}.ini"
        self.config.write_text("\n".join(lines) + "\n")
        self.log_path = tmp_path / f"gateway-{self.port}.log"
        log = open(self.log_path, "wb")
        how = ["-c", "conf/gunicorn.conf.py"] if use_conf_file else \
            ["-k", WORKER_CLASS, "--no-control-socket"]
        self.proc = subprocess.Popen(
            [GUNICORN, *how, "-b", f"127.0.0.1:{self.port}", "-w", str(workers),
             *gunicorn_args, "greentask.ws:app"], cwd=ROOT,
            stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "GREENTASK_CONFIG": str(self.config)})
        log.close()
        wait_until(lambda: port_open(self.port), 30, f"gunicorn\n{self.log()}")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def connect(self, **options: object) -> websocket.WebSocket:
        return websocket.create_connection(self.url, timeout=20, **options)

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGQUIT)


@pytest.fixture
def make_gateway(tmp_path):
    started = []

    def make(daemon, **settings):
        gateway = Gateway(tmp_path, daemon.address if daemon else settings.pop("task_servers"),
                          **settings)
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        gateway.stop()


def write_version_module(directory, version: int) -> None:
    (directory / "versioned_tasks.py").write_text(
        "from greentask import task\n\n\n"
        f"@task\ndef version():\n    return {version}\n")


@pytest.fixture
def versioned(tmp_path, make_daemon):
    """A daemon serving a task module that the test can rewrite."""
    modules = tmp_path / "modules"
    modules.mkdir()
    write_version_module(modules, 1)
    daemon = make_daemon(tasks="greentask.examples.basic, versioned_tasks",
                         env={"PYTHONPATH": str(modules)})
    return daemon, modules


class MailCatcher:
    """``python -m greentask.examples.mailcatcher`` on free ports, stopped by pid in teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.smtp_port, self.http_port = free_port(), free_port()
        self.log_path = tmp_path / f"mailcatcher-{self.smtp_port}.log"
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "greentask.examples.mailcatcher", "--smtp",
             f"127.0.0.1:{self.smtp_port}", "--http", f"127.0.0.1:{self.http_port}"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(lambda: port_open(self.smtp_port) and port_open(self.http_port), 30,
                   f"the mail catcher\n{self.log_path.read_text()}")

    @property
    def http_address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    def messages(self) -> dict:
        """Its ``GET /messages``."""
        with urllib.request.urlopen(f"http://{self.http_address}/messages", timeout=10) as r:
            return json.load(r)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def mail_catcher(tmp_path):
    catcher = MailCatcher(tmp_path)
    yield catcher
    catcher.stop()
