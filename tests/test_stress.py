"""scripts/stress runs end to end, small (its full-size figures go in the closing note)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.timeout(240)


def test_stress_prints_one_line_per_scenario_and_every_one_holds():
    result = subprocess.run(
        [sys._base_executable, "scripts/stress", "--scale", "0.01", "--no-burners",
         "--only", "hup,kill,metrics,idle,gateway"],
        cwd=ROOT, capture_output=True, text=True, timeout=220)
    lines = result.stdout.splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    names = [line.split()[0] for line in lines[:-1]]
    assert names == ["hup", "kill", "metrics", "idle", "gateway"], lines
    for line in lines[:-1]:
        assert line.endswith("OK") and " lost=0 hangs=0 crashed=0 " in line, line
    assert lines[-1] == "5 of 5 scenarios held"


def test_stress_names_an_unknown_scenario():
    result = subprocess.run([sys._base_executable, "scripts/stress", "--only", "nope"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown scenario nope; the scenarios are hup, scale" in result.stderr
