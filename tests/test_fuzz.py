"""Coverage-guided fuzzing of the protocol with atheris, when it installs (CPython wheels)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from .conftest import ROOT

pytest.importorskip("atheris", reason="atheris does not install here; hypothesis still fuzzes")

#: Inputs tried per run, and the most seconds it may take: a regression check
#: that keeps CI within its budget. A longer hunt is run by hand, as in
#: tests/fuzz/fuzz_protocol.py's docstring.
RUNS, MAX_SECONDS = 10_000, 6

SEEDS = [b'{"function": "echo", "args": [1, "two", {"3": null}], "id": 7}\n',
         b'{"auth": "token"}\n{"function": "sleep", "args": {"seconds": 0.1}, "progress": true}\n',
         b'{"ok": true, "id": 1, "result": [1]}\n{"id": 2, "progress": {"step": 1}}\n',
         b'{"ok": false, "id": "x", "error": {"type": "TaskError", "message": "m"}}\n',
         b'{"closing": true}\r\n\n\n', b"hello world\n"]


def test_random_bytes_never_break_the_decoder_or_the_parsers(tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(ROOT / "tests" / "data" / "bad", corpus)
    (corpus / "README.md").unlink()
    for i, seed in enumerate(SEEDS):
        (corpus / f"seed-{i}").write_bytes(b"\xff\x08" + seed)  # max_line 1021, reads of 9
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "fuzz" / "fuzz_protocol.py"), f"-runs={RUNS}",
         f"-max_total_time={MAX_SECONDS}", "-max_len=4096", f"-artifact_prefix={tmp_path}/",
         str(corpus)],
        cwd=ROOT, capture_output=True, text=True, timeout=MAX_SECONDS + 60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done" in result.stderr
