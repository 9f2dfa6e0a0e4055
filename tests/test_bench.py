"""scripts/bench runs end to end (its figures are read by people, not asserted)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.timeout(180)


def test_bench_prints_a_row_per_scenario_without_errors():
    # Started by the Python .venv was made from (no gevent there), as the
    # shebang's python3 would be: the script re-runs itself with .venv's.
    # This checkout is its own baseline: the rows of a before/after run.
    result = subprocess.run(
        [sys._base_executable, "scripts/bench", "--seconds", "0.5", "--runs", "2",
         "--concurrency", "4", "--baseline", str(ROOT)],
        cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith("| echo") or line.startswith("| sleep")]
    assert [(cells[0].strip(), cells[1].strip()) for cells in rows] == [
        (scenario, server) for scenario in ("echo, persistent, C=4",
                                            "echo, connect per task, C=64",
                                            "sleep(0.01), persistent, C=1000")
        for server in ("reference", "greentask", "baseline")]
    for cells in rows:
        assert int(cells[2].replace(",", "")) > 0  # tasks/s
        assert cells[7].strip() == "0"  # errors
        # The bare reference may leave some of 1,000 sockets unanswered in half a
        # second on a busy machine; greentask must not.
        if (cells[0].strip(), cells[1].strip()) != ("sleep(0.01), persistent, C=1000",
                                                   "reference"):
            assert cells[8].strip() == "0"  # starved connections


def test_bench_gateway_mode_prints_a_row_per_worker_count():
    # Without a Workerman checkout (WORKERMAN_DIR), the PHP gateway's rows are left out.
    env = {k: v for k, v in os.environ.items() if k not in ("WORKERMAN_DIR", "COROUTINE_DIR")}
    result = subprocess.run(
        [sys.executable, "scripts/bench", "--gateway", "--seconds", "0.5", "--runs", "1",
         "--sockets", "4", "--inflight", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=150, env=env)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith(("| gateway", "| seed"))]
    assert [(cells[0].strip(), cells[1].strip()) for cells in rows] == [
        ("seed's contract, 1 worker(s), S=4 x M=1", "reference"),
        ("seed's contract, 1 worker(s), S=4 x M=1", "greentask"),
        ("seed's contract, 2 worker(s), S=4 x M=1", "reference"),
        ("seed's contract, 2 worker(s), S=4 x M=1", "greentask"),
        ("gateway echo, 1 worker(s), S=4 x M=2", "greentask"),
        ("gateway echo, 2 worker(s), S=4 x M=2", "greentask")]
    for cells in rows:
        assert int(cells[2].replace(",", "")) > 0
        assert cells[7].strip() == "0"
    assert float(rows[1][6]) > 0  # greentask's ratio to the reference gateway


def test_profile_prints_the_heaviest_frames_of_a_loaded_worker():
    result = subprocess.run([sys.executable, "scripts/profile", "--seconds", "1", "--top", "10"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '"errors": 0' in result.stdout
    sections = result.stdout.split("\ninclusive")
    assert "self (" in sections[0] and len(sections) == 2
    # The worker's own frames were sampled (which of its modules leads depends on
    # how much CPU the machine leaves it: a run beside heavy load missed server.py).
    assert "greentask/daemon/" in sections[1]


def test_bench_tls_mode_compares_tls_with_plain_text():
    result = subprocess.run(
        [sys.executable, "scripts/bench", "--tls", "--seconds", "0.5", "--runs", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith("| echo")]
    assert [(cells[0].strip(), cells[1].strip()) for cells in rows] == [
        ("echo, persistent, C=64", "plain"), ("echo, persistent, C=64", "TLS"),
        ("echo, connect per task, C=64", "plain"), ("echo, connect per task, C=64", "TLS")]
    for cells in rows:
        assert int(cells[2].replace(",", "")) > 0  # tasks/s
        assert cells[7].strip() == "0"  # errors


def test_bench_client_mode_measures_each_python_client():
    result = subprocess.run(
        [sys.executable, "scripts/bench", "--client", "aio", "--seconds", "0.3", "--runs", "1",
         "--concurrency", "1,16"], cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith("| echo from one client process")]
    assert [cells[1].strip() for cells in rows] == [
        "TaskClient, greenlets", "AsyncTaskClient, uvloop", "AsyncTaskClient, asyncio",
        "TaskClient, threads"] * 2
    assert [cells[0].strip() for cells in rows[::4]] == [
        "echo from one client process, 1 callers", "echo from one client process, 16 callers"]
    for cells in rows:
        assert int(cells[2].replace(",", "")) > 0  # calls/s
        assert cells[7].strip() == "0"  # errors


def test_cpu_per_request_prints_cpu_and_calls_for_this_checkout():
    result = subprocess.run(
        [sys.executable, "scripts/cpu_per_request", "--connections", "4", "--rounds", "5",
         "--depth", "8", "--profile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert str(ROOT / "greentask" / "__init__.py") in result.stdout
    assert "us CPU per request" in result.stdout and "(160 requests)" in result.stdout
    calls = float(result.stdout.split(", ")[1].split()[0])
    assert 10 < calls < 200  # Python calls per request: the server path did run


def test_pingpong_prints_both_round_trips_their_ratio_and_the_steps():
    result = subprocess.run(
        [sys.executable, "scripts/pingpong", "--requests", "200", "--rounds", "2", "--steps",
         "--floor"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[:3]] == ["reference", "greentask", "floor"]
    reference, greentask, floor = (float(line.split()[1]) for line in lines[:3])
    # µs: each server answered every request (the floor raises on anything else)
    assert 0 < reference < 10_000 and 0 < greentask < 10_000 and 0 < floor < 10_000
    # the ratio is of the unrounded means; the printed means are rounded to 0.1 µs
    for line, measured in ((lines[1], greentask), (lines[2], floor)):
        ratio = float(line.split("(ratio ")[1].split(")")[0])
        assert abs(ratio - reference / measured) <= 0.011, lines[:3]
    # each server's CPU per request: it ran in the measuring process
    assert all(float(line.split("server CPU ")[1].split()[0]) > 0 for line in lines[:3])
    assert len(lines[3].split(": ")[1].split()) == 2  # one ratio per round
    names = {line.rsplit(None, 2)[0] for line in lines[4:]}
    assert {"parse_request", "encode_result", "Slot.count_task"} <= names, lines
    assert all(float(line.split()[-2]) > 0 for line in lines[4:])  # ns per step


def test_pingpong_counts_instructions_per_request_of_both_servers_under_callgrind():
    result = subprocess.run(
        [sys.executable, "scripts/pingpong", "--instructions", "--requests", "100",
         "--warm-up", "50"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["reference", "greentask"], lines
    reference, greentask = (int(line.split()[1].replace(",", "")) for line in lines)
    # Each server's Python and C per request: thousands of instructions, not
    # the millions start-up costs (the count began after the warm-up).
    assert 5_000 < reference < 500_000 and 5_000 < greentask < 500_000, lines
    assert lines[0].endswith("(1.00 times the reference's)")
    ratio = float(lines[1].split("(")[1].split()[0])  # of the unrounded counts
    assert abs(ratio - greentask / reference) <= 0.011, lines
