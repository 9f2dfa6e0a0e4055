"""Task code: import it (master and workers), and import it again in the master on reload.

With ``[worker] preload_tasks`` (the default) the master imports the task
modules after gevent's monkey patching, so every worker shares their memory
instead of each importing its own copy. A reload (HUP) must serve the new
code, so :meth:`TaskCode.reload` makes the master forget the modules that
importing the tasks brought in from outside the Python installation (the task
modules and their helpers) and import them again. Modules from the standard
library and site-packages are never imported twice: re-running a library's
import is unsafe (extension modules load once per process, and some libraries
refuse or warn), so an installed package changes only on a restart, like
``[worker] preload``. If the new code does not import, the old modules and
tasks are put back and the running workers keep serving.
"""

from __future__ import annotations

import importlib
import os
import site
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

from greentask.errors import GreentaskError
from greentask.registry import Registry


class TaskModuleError(GreentaskError):
    """A module listed in ``[worker] tasks`` or ``[worker] preload`` does not import."""


def import_task_modules(modules: list[str]) -> None:
    """Import each task module, so its ``@task`` functions register.

    Raises :class:`TaskModuleError` naming the module and what it raised.
    """
    import_listed(modules, "task module", "tasks")


def import_listed(modules: list[str], kind: str, setting: str) -> None:
    """Import ``modules``, listed in ``[worker] setting``; raises :class:`TaskModuleError`."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise TaskModuleError(f"cannot import {kind} {name!r} (listed in [worker] "
                                  f"{setting}): {type(exc).__name__}: {exc}") from exc


#: Where the interpreter's own modules and installed packages live (resolved,
#: with a trailing separator, so a sibling such as ``site-packages-old`` is not inside).
LIBRARY_DIRS = tuple(sorted({os.path.join(os.path.realpath(directory), "") for directory in (
    os.path.dirname(os.__file__), *site.getsitepackages(), site.getusersitepackages())}))


def is_reloadable(module: ModuleType) -> bool:
    """True for Python source outside the standard library and site-packages."""
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):  # built in, extension, namespace package
        return False
    return not os.path.realpath(path).startswith(LIBRARY_DIRS)


class SavedCode(NamedTuple):
    """The task table and reloadable modules of the master before a reload."""

    tasks: dict[str, Callable[..., Any]]
    modules: dict[str, ModuleType]


class TaskCode:
    """The task modules the master imported, and how to import them again."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        #: The reloadable modules the last import brought in, by name.
        self.modules: dict[str, ModuleType] = {}

    def describe(self, settings: Any) -> str:
        """The task modules and the tasks they registered, for the start-up log."""
        modules = ", ".join(settings.tasks)
        if not settings.preload_tasks:
            return f"task modules {modules}: each worker imports them (preload_tasks = false)"
        names = self.registry.names()
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        return f"task modules {modules}: {len(names)} tasks ({shown})"

    def load(self, names: list[str]) -> None:
        """Import the task modules ``names``; raises :class:`TaskModuleError`."""
        before = set(sys.modules)
        try:
            import_task_modules(names)
        finally:
            self.modules.update((name, sys.modules[name]) for name in set(sys.modules) - before
                                if is_reloadable(sys.modules[name]))

    def forget(self) -> dict[str, ModuleType]:
        """Drop the reloadable task modules and their tasks; return the modules dropped."""
        dropped, self.modules = self.modules, {}
        for name in dropped:
            sys.modules.pop(name, None)
        self.registry.remove_tasks_of(dropped)
        importlib.invalidate_caches()
        return dropped

    def reload(self, names: list[str] | None) -> SavedCode:
        """Import the task code ``names`` again (None: drop it from the master).

        Returns what it replaced, for :meth:`restore` if the new generation
        fails to boot. If the new code does not import, puts the old back and raises.
        """
        saved = SavedCode(self.registry.snapshot(), self.forget())
        if names is not None:
            try:
                self.load(names)
            except Exception:
                self.restore(saved)
                raise
        return saved

    def restore(self, saved: SavedCode) -> None:
        """Put back the code a :meth:`reload` replaced, dropping what it imported."""
        self.forget()
        sys.modules.update(saved.modules)
        self.modules = dict(saved.modules)
        self.registry.restore(saved.tasks)
