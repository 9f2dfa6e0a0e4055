"""A forked worker's life: patch, import the task modules, serve.

The master (:mod:`greentask.arbiter`) forks before any gevent hub exists and
calls :func:`run_worker` in the child. Only here, after ``patch_all``, are
gevent and the task modules imported, so blocking stdlib I/O in tasks
cooperates and a reload imports task code afresh.
"""

from __future__ import annotations

import faulthandler
import gc
import importlib
import logging
import os
import pwd
import random
import signal
import socket
from typing import Any

from greentask.config import Config, set_current
from greentask.errors import GreentaskError

log = logging.getLogger("greentask.worker")

#: Signals a worker handles (stop gracefully, stop now, reopen logs). The
#: master blocks them across the fork and the worker unblocks them once its
#: handlers are in place, so one sent to a booting worker waits instead of
#: hitting the handler it inherited from the master, which would drop it.
WORKER_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1})
#: Exit status: stopped as asked.
EXIT_OK = 0
#: Exit status: workers cannot start (a task module does not import).
EXIT_BOOT_ERROR = 3


def set_process_title(title: str) -> None:
    """Show ``title`` in ps and top, when setproctitle is installed."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(title)


class TaskModuleError(GreentaskError):
    """A ``[worker] tasks`` module does not import."""


def import_task_modules(modules: list[str]) -> None:
    """Import each task module, so its ``@task`` functions register.

    Raises :class:`TaskModuleError` naming the module and what it raised.
    """
    _import_listed(modules, "task module", "tasks")


def _import_listed(modules: list[str], kind: str, setting: str) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise TaskModuleError(f"cannot import {kind} {name!r} (listed in [worker] "
                                  f"{setting}): {type(exc).__name__}: {exc}") from exc


#: Modules every worker imports; the master imports them once, before it
#: forks, so their memory is shared by all children. Importing gevent before a
#: hub exists, and patching in the child, is what gunicorn's gevent worker does.
SHARED_MODULES = (
    "greentask.server", "gevent.monkey", "gevent.socket", "gevent.ssl", "gevent.select",
    "gevent.selectors", "gevent.thread", "gevent.threading", "gevent.time", "gevent.os",
    "gevent.signal", "gevent.subprocess", "gevent.queue", "gevent.local", "gevent.events",
    "concurrent.futures", "importlib.metadata",
    # Imported lazily by the hub, its loop, resolver and thread pool: loaded
    # here they also work for workers that switched to a user who cannot read
    # the Python installation.
    "pprint", "gevent.libev.corecext", "gevent.resolver.thread", "gevent.threadpool",
)


#: Every installed package's entry points, read once by the master (see patch_gevent).
_installed_entry_points: Any = None


def preload_shared_modules(extra: list[str]) -> None:
    """Import the workers' modules (and ``[worker] preload``) in the master, then freeze them.

    Raises :class:`TaskModuleError` when one of ``extra`` does not import.
    """
    for name in SHARED_MODULES:
        importlib.import_module(name)
    global _installed_entry_points
    from importlib import metadata
    _installed_entry_points = metadata.entry_points()
    _import_listed(extra, "module", "preload")
    gc.collect()
    gc.freeze()


def drop_privileges(uid: int | None, gid: int | None) -> None:
    """Become ``uid`` and ``gid`` (the user's primary group when ``gid`` is None)."""
    if uid is None and gid is None:
        return
    if gid is None and uid is not None:
        gid = pwd.getpwuid(uid).pw_gid
    if gid is not None:
        os.setgroups([gid])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)


def patch_gevent() -> None:
    """``gevent.monkey.patch_all()``, looking gevent's plugins up in the master's list.

    patch_all announces each step to plugins found through
    ``importlib.metadata.entry_points``, which reads every installed package's
    metadata again for each of about fifteen events. The master read them once
    (:func:`preload_shared_modules`); answering from that list gives the same
    plugins and spares each worker about 1 MiB of private memory.
    """
    from importlib import metadata

    from gevent import monkey
    if _installed_entry_points is None:
        monkey.patch_all()
        return
    installed = _installed_entry_points
    read_again = metadata.entry_points
    metadata.entry_points = lambda **selection: installed.select(**selection)  # type: ignore
    try:
        monkey.patch_all()
    finally:
        metadata.entry_points = read_again


def run_worker(listener: socket.socket, config: Config, master_pid: int, number: int,
               slot_index: int, scoreboard: object) -> int:
    """Patch, import the tasks, serve until stopped; return the exit status."""
    patch_gevent()
    import gevent.socket

    from greentask.registry import default_registry
    from greentask.server import Worker

    set_process_title(f"greentask worker [{config.worker.name}] #{number}")
    # SIGABRT from the watchdog then prints where the blocked task was.
    faulthandler.enable()
    set_current(config)
    try:
        drop_privileges(config.worker.user, config.worker.group)
    except OSError as exc:
        log.error("worker %d cannot switch to [worker] user/group: %s; start the master as "
                  "root, or leave user and group empty", os.getpid(), exc)
        return EXIT_BOOT_ERROR
    try:
        import_task_modules(config.worker.tasks)
    except TaskModuleError as exc:
        log.error("worker %d %s", os.getpid(), exc, exc_info=exc.__cause__)
        return EXIT_BOOT_ERROR
    # A socket made before monkey-patching is not a gevent socket; serving it
    # as-is accepts nothing, so re-wrap its descriptor (as gunicorn's gevent
    # worker does).
    gevent_listener = gevent.socket.socket(fileno=listener.detach())
    max_tasks = config.worker.max_tasks_per_child
    if max_tasks:
        max_tasks += random.randint(0, config.worker.max_tasks_jitter)
    slot = scoreboard.slot(slot_index)  # type: ignore[attr-defined]
    Worker(gevent_listener, config, default_registry, master_pid, slot, max_tasks).serve_forever()
    return EXIT_OK
