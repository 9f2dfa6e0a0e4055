"""The task runner in-process (tier 2): permits, deadlines, outcomes, greenlet reuse.

Each test builds a real TaskRunner on this process's gevent hub, with a real
scoreboard slot, and drives it through its TaskOwner seam.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import greenlet
import pytest
import ujson
from gevent.event import Event

from greentask.daemon import scoreboard
from greentask.daemon.runner import COARSE_TIMEOUT_MIN, TaskRunner
from greentask.errors import BadArguments
from greentask.protocol import Request
from greentask.registry import Registry, progress


class Replies:
    """A TaskOwner that keeps what the runner sends it."""

    peer = "127.0.0.9"

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []
        self.finished = 0

    def send(self, data: bytes) -> None:
        self.lines.extend(ujson.loads(line) for line in data.splitlines())

    def task_finished(self) -> None:
        self.finished += 1

    def final(self, request_id: Any) -> dict[str, Any]:
        return next(line for line in self.lines if line.get("id") == request_id
                    and "progress" not in line)


def green_wait(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` while letting the hub run; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        gevent.sleep(0.005)


def make_runner(registry: Registry, **options: Any) -> tuple[TaskRunner, scoreboard.Slot]:
    board = scoreboard.Scoreboard(1)
    slot = board.slot(board.claim(generation=1))
    options.setdefault("concurrency", 100)
    options.setdefault("task_timeout", 30.0)
    runner = TaskRunner(registry, slot, **options)
    runner.sweep.start()
    return runner, slot


def request(function: str, args: Any = (), request_id: Any = 1, **fields: Any) -> Request:
    return Request(function, list(args) if not isinstance(args, dict) else args, request_id,
                   progress=fields.get("progress", False), timeout=fields.get("timeout"))


@pytest.fixture
def registry() -> Registry:
    tasks = Registry()
    tasks.add(lambda value: value, "echo")
    tasks.add(lambda seconds: gevent.sleep(seconds), "sleep")
    return tasks


def test_permits_bound_running_tasks_and_every_task_finishes_once(registry):
    release = Event()
    registry.add(lambda: release.wait(), "hold")
    runner, slot = make_runner(registry, concurrency=2)
    owner = Replies()
    submitters = [gevent.spawn(runner.submit, request("hold", request_id=i),
                               registry.lookup("hold"), owner) for i in range(5)]
    green_wait(lambda: len(runner.running) == 2, 5, "two tasks running")
    gevent.sleep(0.05)
    assert len(runner.running) == 2  # the other three wait for a permit
    assert slot.get(scoreboard.INFLIGHT) == 2
    assert sum(not s.dead for s in submitters) == 3
    release.set()
    green_wait(lambda: owner.finished == 5, 5, "all five tasks")
    assert sorted(line["id"] for line in owner.lines) == [0, 1, 2, 3, 4]
    assert all(line == {"id": line["id"], "ok": True, "result": True} for line in owner.lines)
    assert slot.get(scoreboard.DONE) == 5 and slot.get(scoreboard.INFLIGHT) == 0
    assert runner.wait_idle(0)


def test_a_request_without_id_runs_in_the_callers_greenlet(registry):
    seen = []
    registry.add(lambda: seen.append(greenlet.getcurrent()), "where")
    runner, _ = make_runner(registry)
    owner = Replies()
    runner.submit(request("where", request_id=None), registry.lookup("where"), owner)
    assert seen == [greenlet.getcurrent()]
    assert owner.lines == [{"ok": True, "result": None}] and owner.finished == 1


def test_outcomes_are_counted_once_each_with_their_reply(registry):
    def fails():
        raise ValueError("no such user")

    def refuses():
        raise BadArguments("wrong shape")

    registry.add(fails, "fails")
    registry.add(refuses, "refuses")
    registry.add(lambda: object(), "not_json")
    runner, slot = make_runner(registry)
    owner = Replies()
    for name in ("echo", "fails", "refuses", "not_json"):
        args = ["x"] if name == "echo" else []
        runner.submit(request(name, args, request_id=None), registry.lookup(name), owner)
    ok, failed, refused, not_json = owner.lines
    assert ok == {"ok": True, "result": "x"}
    assert failed["error"] == {"type": "TaskError", "message": "ValueError: no such user"}
    assert refused["error"]["type"] == "BadArguments"
    assert not_json["error"]["type"] == "TaskError" and "not JSON" in \
        not_json["error"]["message"]
    assert (slot.get(scoreboard.DONE), slot.get(scoreboard.FAILED),
            slot.get(scoreboard.TIMED_OUT)) == (1, 3, 0)
    assert {name: row[:4] for name, row in slot.functions().items()} == {
        "echo": [1, 0, 0, 0], "fails": [0, 1, 0, 0], "refuses": [0, 1, 0, 0],
        "not_json": [0, 1, 0, 0]}
    # The dashboard's last failures: when, which function, the error's type and message.
    failures = runner.activity()["failures"]
    assert [(f["function"], f["error"], f["message"]) for f in failures] == [
        ("fails", "ValueError", "no such user"), ("refuses", "BadArguments", "wrong shape"),
        ("not_json", "TaskError", not_json["error"]["message"])]
    assert all(abs(f["at"] - time.time()) < 60 for f in failures)


def test_arguments_that_do_not_fit_are_bad_arguments_and_a_tasks_own_type_error_is_not(
        registry):
    def adds(a, b=1):
        return a + b  # a TypeError of its own for adds("x")

    registry.add(adds, "adds")
    runner, slot = make_runner(registry)
    owner = Replies()
    for request_id, args in enumerate(([1, 2], {"a": 1}, [], {"c": 1}, [1, 2, 3], ["x"])):
        runner.submit(request("adds", args, request_id=request_id), registry.lookup("adds"),
                      owner)
    green_wait(lambda: owner.finished == 6, 5, "six replies")
    assert [owner.final(i).get("result") for i in (0, 1)] == [3, 2]
    for request_id in (2, 3, 4):
        error = owner.final(request_id)["error"]
        assert error["type"] == "BadArguments" and "the signature is adds(a, b=1)" in \
            error["message"], error
    assert owner.final(5)["error"]["type"] == "TaskError" and \
        owner.final(5)["error"]["message"].startswith("TypeError: can only concatenate")
    assert (slot.get(scoreboard.DONE), slot.get(scoreboard.FAILED)) == (2, 4)


def test_a_short_limit_has_its_own_timer_and_is_not_swallowed_by_the_task(registry):
    def stubborn():
        try:
            gevent.sleep(5)
        except Exception:  # the deadline is a BaseException: this does not catch it
            return "caught"

    registry.add(stubborn, "stubborn")
    runner, slot = make_runner(registry)
    owner = Replies()
    started = time.monotonic()
    runner.submit(request("stubborn", request_id=7, timeout=0.2), registry.lookup("stubborn"),
                  owner)
    green_wait(lambda: owner.finished, 5, "the timeout")
    assert time.monotonic() - started < 2
    assert owner.final(7)["error"]["type"] == "Timeout"
    assert "0.2 s" in owner.final(7)["error"]["message"]
    assert slot.get(scoreboard.TIMED_OUT) == 1 and not runner.running


def test_a_long_limit_is_enforced_by_the_sweep(registry):
    runner, slot = make_runner(registry, task_timeout=COARSE_TIMEOUT_MIN)
    owner = Replies()
    runner.submit(request("sleep", [30], request_id=1), registry.lookup("sleep"), owner)
    green_wait(lambda: runner.running, 5, "the task running")
    (_, _, started), = runner.running.values()
    green_wait(lambda: owner.finished, COARSE_TIMEOUT_MIN + 5, "the sweep's timeout")
    assert time.monotonic() - started >= COARSE_TIMEOUT_MIN  # not before its limit
    assert owner.final(1)["error"]["type"] == "Timeout"
    assert slot.get(scoreboard.TIMED_OUT) == 1 and not runner.running


def test_running_tasks_are_findable_by_owner_and_id(registry):
    release = Event()
    registry.add(lambda: release.wait(), "hold")
    runner, _ = make_runner(registry)
    first, second = Replies(), Replies()
    runner.submit(request("hold", request_id="a"), registry.lookup("hold"), first)
    runner.submit(request("hold", request_id="a"), registry.lookup("hold"), second)
    green_wait(lambda: len(runner.running) == 2, 5, "both running")
    found = runner.find(second, "a")
    assert found is not None and runner.running[found][0] is second
    assert runner.running[found][1].id == "a"
    assert runner.find(first, "b") is None
    release.set()
    green_wait(lambda: first.finished and second.finished, 5, "both done")
    assert runner.find(second, "a") is None


def test_progress_goes_to_the_owner_before_the_result(registry):
    def counts():
        for i in range(3):
            progress(i)
        return "done"

    registry.add(counts, "counts")
    runner, _ = make_runner(registry)
    owner = Replies()
    runner.submit(request("counts", request_id=3, progress=True), registry.lookup("counts"),
                  owner)
    green_wait(lambda: owner.finished, 5, "the task")
    assert owner.lines == [{"id": 3, "progress": 0}, {"id": 3, "progress": 1},
                           {"id": 3, "progress": 2}, {"id": 3, "ok": True, "result": "done"}]


def test_greenlets_are_reused_and_the_recycle_threshold_is_reported(registry):
    seen = set()
    registry.add(lambda: seen.add(id(greenlet.getcurrent())), "where")
    reasons = []
    runner, _ = make_runner(registry, max_tasks=3, on_recycle=reasons.append)
    owner = Replies()
    for i in range(3):
        runner.submit(request("where", request_id=i), registry.lookup("where"), owner)
        green_wait(lambda i=i: owner.finished == i + 1, 5, f"task {i}")
    assert len(seen) == 1  # one greenlet ran all three
    assert reasons == ["it has run max_tasks_per_child (3) tasks"]


def test_a_drain_that_runs_out_of_time_kills_what_still_runs(registry):
    runner, _ = make_runner(registry)
    owner = Replies()
    runner.submit(request("sleep", [30], request_id=1), registry.lookup("sleep"), owner)
    green_wait(lambda: runner.running, 5, "the task to start")
    assert not runner.wait_idle(0.05)
    runner.kill_all()
    green_wait(lambda: owner.finished, 5, "the killed task to finish")
    assert runner.wait_idle(0) and not runner.running


@pytest.mark.parametrize("debug", [False, True])
def test_the_dashboard_sees_running_tasks_oldest_first_and_cancels_one_by_key(registry, debug):
    def mails(recipients):
        progress({"sent": 3, "total": len(recipients), "last": recipients[0]})
        gevent.sleep(30)

    registry.add(mails, "mails")
    runner, _ = make_runner(registry, debug=debug)
    owner = Replies()
    runner.submit(request("sleep", [30], request_id=1), registry.lookup("sleep"), owner)
    gevent.sleep(0.01)
    runner.submit(request("mails", [["ann@example.com"]], request_id=2, progress=True),
                  registry.lookup("mails"), owner)
    green_wait(lambda: len(runner.running) == 2 and owner.lines, 5, "both tasks to run")
    running = runner.activity()["running"]
    assert [task["function"] for task in running] == ["sleep", "mails"]  # oldest first
    assert running[0]["age"] > running[1]["age"] > 0
    # No argument is shown; progress only as numbers, unless debug is on.
    assert "ann@example.com" not in str(running) or debug
    assert running[1]["progress"] == ({"sent": 3, "total": 1, "last": "ann@example.com"}
                                      if debug else {"sent": 3, "total": 1})
    assert runner.cancel_key((running[1]["key"][0], running[1]["key"][1] + 1)) is False
    assert runner.cancel_key(tuple(running[1]["key"])) is True
    green_wait(lambda: any(line.get("id") == 2 and "error" in line for line in owner.lines),
               5, "the cancelled task's reply")
    assert owner.final(2)["error"] == {"type": "Cancelled",
                                       "message": "the task was cancelled from the dashboard"}
    assert [task["function"] for task in runner.activity()["running"]] == ["sleep"]
    runner.kill_all()


def test_the_hot_path_runs_compiled_unless_installed_with_greentask_compile_0():
    """setup.py compiles its HOT_PATH with mypyc; the suite runs what it installed.

    .ci/run tests the compiled modules on 3.11 and 3.12, the source on 3.13.
    """
    setup_py = (Path(__file__).parent.parent / "setup.py").read_text()
    hot_path = ast.literal_eval(re.search(r"^HOT_PATH = (\[.*?\])", setup_py, re.M | re.S)[1])
    assert "greentask/daemon/runner.py" in hot_path
    compiled = os.environ.get("GREENTASK_COMPILE", "1") != "0"
    for path in hot_path:
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert module.__file__.endswith(".so") == compiled, (
            f"{module.__name__} is {module.__file__}: install with scripts/_venv.sh (it "
            "needs a C compiler), or run with GREENTASK_COMPILE=0 to test the source")
