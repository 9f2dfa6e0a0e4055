"""What the master imports again on a reload (greentask.daemon.taskcode), in-process."""

from __future__ import annotations

import json
import sys
import time

import pytest
import trustme
import ujson

import greentask.examples.basic
from greentask.daemon.taskcode import TaskCode, TaskModuleError, is_reloadable
from greentask.registry import default_registry


def test_only_python_source_outside_the_installation_is_reloadable(tmp_path, monkeypatch):
    (tmp_path / "project_module.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import project_module
    try:
        assert is_reloadable(project_module)
        assert is_reloadable(greentask.examples.basic) == ("site-packages" not in
                                                           greentask.examples.basic.__file__)
        assert not is_reloadable(json)      # standard library
        assert not is_reloadable(trustme)   # site-packages, pure Python
        assert not is_reloadable(ujson)     # extension module
        assert not is_reloadable(sys)       # built in
    finally:
        del sys.modules["project_module"]


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A task module and its helper in a directory on sys.path; forgotten afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    code = TaskCode(default_registry)
    yield tmp_path, code
    code.forget()


def write(directory, tasks: str, helper: str) -> None:
    (directory / "code_tasks.py").write_text(tasks)
    (directory / "code_helper.py").write_text(helper)
    # Bytecode is reused when the mtime (whole seconds) and size match.
    time.sleep(1.1)


TASKS = ("import code_helper\nfrom greentask import task\n\n\n"
         "@task\ndef code_version():\n    return code_helper.VERSION\n")


def test_load_reload_and_a_failed_reload(project):
    directory, code = project
    write(directory, TASKS, "VERSION = 1\n")
    code.load(["code_tasks"])
    assert set(code.modules) == {"code_tasks", "code_helper"}
    assert default_registry.lookup("code_version")() == 1

    write(directory, TASKS, "VERSION = 2\n")
    code.reload(["code_tasks"])
    assert default_registry.lookup("code_version")() == 2

    kept = dict(code.modules)
    write(directory, TASKS + "raise RuntimeError('half-written')\n", "VERSION = 3\n")
    with pytest.raises(TaskModuleError, match="RuntimeError: half-written"):
        code.reload(["code_tasks"])
    assert code.modules == kept
    assert sys.modules["code_tasks"] is kept["code_tasks"]
    assert default_registry.lookup("code_version")() == 2
    assert "echo" in default_registry.names()  # tasks of other modules stay


def test_forget_drops_the_modules_and_their_tasks(project):
    directory, code = project
    write(directory, TASKS, "VERSION = 1\n")
    code.load(["code_tasks"])
    code.forget()
    assert "code_tasks" not in sys.modules and "code_helper" not in sys.modules
    assert "code_version" not in default_registry.names()


def test_restore_puts_back_the_code_a_reload_replaced(project):
    directory, code = project
    write(directory, TASKS, "VERSION = 1\n")
    code.load(["code_tasks"])
    old = dict(code.modules)
    write(directory, TASKS, "VERSION = 2\n")
    saved = code.reload(["code_tasks"])
    assert default_registry.lookup("code_version")() == 2
    code.restore(saved)
    assert code.modules == old and sys.modules["code_tasks"] is old["code_tasks"]
    assert default_registry.lookup("code_version")() == 1

    saved = code.reload(None)  # preload_tasks turned off: the master drops the code
    assert "code_tasks" not in sys.modules and "code_version" not in default_registry.names()
    code.restore(saved)
    assert default_registry.lookup("code_version")() == 1
