"""The import contracts of .importlinter hold, and break when an import points the wrong way."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(LINT_IMPORTS), str(tree / ".importlinter"), "--no-cache",
                           "--no-logo"], cwd=tree, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(tree)})


@pytest.fixture
def copy_of_package(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "greentask", tmp_path / "greentask",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".importlinter", tmp_path)
    return tmp_path


def test_the_package_keeps_every_contract():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize(("module", "planted", "contract"), [
    ("client.py", "from greentask.config import load", "Three wings over one core"),
    ("daemon/server.py", "from greentask.client import TaskClient",
     "The daemon uses the core, never the client or the gateway"),
    ("protocol.py", "import gevent", "never import gevent"),
    # The clients' core is below both clients, which do not import each other.
    ("calls.py", "from greentask.client import TaskClient", "Three wings over one core"),
    ("aio/__init__.py", "from greentask.client import TaskClient", "Three wings over one core"),
    ("examples/fastapi_app.py", "import gevent", "The example FastAPI app is a caller"),
    # A deferred import makes a cycle too.
    ("daemon/writer.py", "def _later():\n    from greentask.daemon import connection",
     "No import cycles"),
])
def test_a_planted_import_breaks_its_contract(copy_of_package, module, planted, contract):
    path = copy_of_package / "greentask" / module
    path.write_text(path.read_text() + "\n\n" + planted + "\n")
    result = lint(copy_of_package)
    assert result.returncode != 0, result.stdout
    broken = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in broken, result.stdout
