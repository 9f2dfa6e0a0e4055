"""``greentask call`` and the README's commands, run as a user runs them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import ujson
import websocket

from .conftest import ROOT, children_of, free_port, pid_alive, port_open, wait_until

pytestmark = pytest.mark.timeout(120)

GREENTASK = str(Path(sys.executable).with_name("greentask"))


def greentask(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([GREENTASK, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=env)


def test_call_prints_the_result(daemon):
    result = greentask("call", "echo", '{"x": 1}', "--server", daemon.address)
    assert result.returncode == 0, result.stderr
    assert ujson.loads(result.stdout) == {"x": 1}


def test_call_prints_progress_lines(daemon):
    result = greentask("call", "steps.count", "[2]", "--progress", "--server", daemon.address)
    assert result.returncode == 0, result.stderr
    assert [ujson.loads(line) for line in result.stdout.splitlines()] == [
        {"progress": {"step": 1}}, {"progress": {"step": 2}}, 2]


def test_call_reads_the_server_from_the_config(daemon):
    result = greentask("call", "echo", "[3]", "-c", str(daemon.config))
    assert result.returncode == 0 and ujson.loads(result.stdout) == [3]


def test_failed_task_exits_1_with_the_error(daemon):
    result = greentask("call", "fail", '["bad day"]', "--server", daemon.address)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: TaskError: RuntimeError: bad day"


def test_unreachable_server_exits_1_and_says_what_to_do():
    result = greentask("call", "echo", "--server", f"127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "Connection refused" in result.stderr and "scripts/run" in result.stderr


@pytest.mark.parametrize("args, words", [
    (["call", "echo", "{not json"], "it starts like JSON: check its brackets"),
    (["call", "sleep", "0.5"], "not a bare value: for one argument, type '[0.5]'"),
    (["call", "send_mail", "{'to': 'a@b.test'}"],
     """that is Python, not JSON; in JSON it is '{"to":"a@b.test"}'"""),
    (["call", "echo", "hello"], """for one string argument type '["hello"]'"""),
    (["call", "echo", "--server", "nowhere"], "bad server 'nowhere'"),
])
def test_bad_command_line_exits_2(args, words):
    result = greentask(*args)
    assert result.returncode == 2
    assert words in result.stderr


def readme_commands() -> list[str]:
    """The shell lines of README.md's code blocks, without comments."""
    commands, in_sh = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_sh = line == "```sh"
            continue
        if in_sh and line.strip():
            commands.append(line.split("  #")[0].strip())
    return commands


def test_readme_commands_work_as_written(tmp_path):
    """scripts/run, then the README's greentask calls, on a free port via the environment."""
    commands = readme_commands()
    assert commands[:2] == ["scripts/run", "scripts/test"]
    port, gateway_port = free_port(), free_port()
    env = {**os.environ, "GREENTASK_WORKER_BIND": f"127.0.0.1:{port}",
           "GREENTASK_WORKER_PROCESSES": "2", "GREENTASK_RUN_DIR": str(tmp_path / "run"),
           "GREENTASK_GATEWAY_TASK_SERVERS": f"127.0.0.1:{port}",
           "GREENTASK_GATEWAY_ALLOWED_ORIGINS": f"http://127.0.0.1:{gateway_port}",
           "GREENTASK_SMTP_PORT": str(free_port()),
           "GREENTASK_GATEWAY_MAIL_CATCHER": f"127.0.0.1:{free_port()}",
           "GUNICORN_CMD_ARGS": f"--bind 127.0.0.1:{gateway_port}"}
    log = open(tmp_path / "run.log", "wb")
    run = subprocess.Popen(["scripts/run"], cwd=ROOT, env=env, stdout=log,
                           stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: port_open(port) and port_open(gateway_port), 120,
                   "scripts/run to serve")
        for command in commands[2:]:
            result = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True,
                                    text=True, timeout=60)
            assert result.returncode == 0, (command, result.stderr)
            assert result.stdout.strip(), command
        ws = websocket.create_connection(f"ws://127.0.0.1:{gateway_port}/ws", timeout=20)
        ws.send("hello from the README test")
        assert ws.recv() == "task complete"
        ws.close()
        programs = children_of(run.pid)
        # The task daemon's master, gunicorn's, the mail catcher, scripts/on_fatal.
        assert len(programs) == 4
    finally:
        run.send_signal(signal.SIGTERM)
        assert run.wait(60) == 0
        log.close()
    wait_until(lambda: not any(pid_alive(pid) for pid in programs), 10, "programs to exit")
    assert "demo page  http://127.0.0.1:8080/" in (tmp_path / "run.log").read_text()


def test_readme_python_example_runs(daemon):
    text = (ROOT / "README.md").read_text()
    example = text.split("## Call a task from Python\n\n```python\n")[1].split("```")[0]
    example = example.replace("127.0.0.1:12345", daemon.address)
    result = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True,
                            timeout=30, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["{'greeting': 'hello'}", "0.1"]


def test_readme_task_example_registers_its_task(tmp_path):
    text = (ROOT / "README.md").read_text()
    example = text.split("## Write a task\n\n```python\n")[1].split("```")[0]
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "tasks.py").write_text(example)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "GREENTASK_WORKER_TASKS": "myapp.tasks"}
    result = subprocess.run([sys.executable, "-m", "greentask.worker", "--check"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("tasks: report.build")
