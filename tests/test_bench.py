"""scripts/bench runs end to end (its figures are read by people, not asserted)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.timeout(180)


def test_bench_prints_a_row_per_scenario_without_errors():
    # Started by the Python .venv was made from (no gevent there), as the
    # shebang's python3 would be: the script re-runs itself with .venv's.
    result = subprocess.run(
        [sys._base_executable, "scripts/bench", "--seconds", "0.5", "--runs", "1",
         "--concurrency", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith("| echo") or line.startswith("| sleep")]
    assert [(cells[0].strip(), cells[1].strip()) for cells in rows] == [
        ("echo, persistent, C=4", "reference"), ("echo, persistent, C=4", "greentask"),
        ("echo, connect per task, C=64", "reference"),
        ("echo, connect per task, C=64", "greentask"),
        ("sleep(0.01), persistent, C=1000", "greentask")]
    for cells in rows:
        assert int(cells[2].replace(",", "")) > 0  # tasks/s
        assert cells[7].strip() == "0"  # errors
        assert cells[8].strip() == "0"  # starved connections


def test_bench_gateway_mode_prints_a_row_per_worker_count():
    result = subprocess.run(
        [sys.executable, "scripts/bench", "--gateway", "--seconds", "0.5", "--runs", "1",
         "--sockets", "4", "--inflight", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith("| gateway")]
    assert [cells[0].strip() for cells in rows] == [
        "gateway echo, 1 worker(s), S=4 x M=2", "gateway echo, 2 worker(s), S=4 x M=2"]
    for cells in rows:
        assert int(cells[2].replace(",", "")) > 0
        assert cells[7].strip() == "0"


def test_profile_prints_the_heaviest_frames_of_a_loaded_worker():
    result = subprocess.run([sys.executable, "scripts/profile", "--seconds", "1", "--top", "5"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert '"errors": 0' in result.stdout
    sections = result.stdout.split("\ninclusive")
    assert "self (" in sections[0] and len(sections) == 2
    assert "greentask/daemon/server.py" in sections[1]  # the worker's own frames were sampled


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
