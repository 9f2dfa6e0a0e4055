"""A forked worker's life (serve), and what the master prepares for it before the fork.

The master (:mod:`greentask.arbiter`) monkey-patches the standard library,
imports gevent, greentask's server, ``[worker] preload`` and (by default) the
task modules, freezes all that for the garbage collector, and forks. The
children share those pages instead of each building its own copy, and every
module they inherit, task code included, already sees gevent's sockets and
locks. :func:`run_worker` is what a child runs.
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


#: Modules every worker uses, imported by the master before it forks.
SHARED_MODULES = (
    "greentask.server", "gevent.socket", "gevent.ssl", "gevent.select", "gevent.selectors",
    "gevent.thread", "gevent.threading", "gevent.time", "gevent.os", "gevent.signal",
    "gevent.subprocess", "gevent.queue", "gevent.local", "gevent.events", "gevent.pool",
    "concurrent.futures",
    # Imported lazily by the hub, its loop, resolver and thread pool: loaded
    # here they also work for workers that switched to a user who cannot read
    # the Python installation.
    "pprint", "gevent.libev.corecext", "gevent.resolver.thread", "gevent.threadpool",
)


def prepare_master(preload: list[str]) -> None:
    """Monkey-patch, then import what every worker uses and ``preload``.

    Patching comes first, as gevent asks, so the modules imported after it
    (``preload``, the task modules) create gevent locks and sockets even when
    they make them at import time. The master itself keeps using the
    unpatched calls and the sockets it made before patching (see
    :mod:`greentask.arbiter`).
    Raises :class:`TaskModuleError` when one of ``preload`` does not import.
    """
    from gevent import monkey
    monkey.patch_all()
    for name in SHARED_MODULES:
        importlib.import_module(name)
    _import_listed(preload, "module", "preload")


def freeze_for_fork() -> None:
    """Hide what the master allocated from the children's garbage collectors.

    A collection in a child would otherwise touch, and so copy, every page
    of the master's objects. Unfreezing first lets the collection free the
    task code a reload replaced.
    """
    gc.unfreeze()
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


def run_worker(listener: socket.socket, config: Config, master_pid: int, number: int,
               slot_index: int, scoreboard: object) -> int:
    """Import the tasks (unless the master did), serve until stopped; return the exit status."""
    import gevent
    import gevent.socket

    # The master has no hub, unless task code made one at import; after a
    # raw fork gevent needs this before the child runs it.
    gevent.reinit()

    from greentask import tls
    from greentask.registry import default_registry
    from greentask.server import Worker

    set_process_title(f"greentask worker [{config.worker.name}] #{number}")
    # SIGABRT from the watchdog then prints where the blocked task was.
    faulthandler.enable()
    set_current(config)
    settings = config.worker
    # Before switching user: the key is usually readable by root only. The
    # master checked these files at start (or reload), so they load.
    ssl_context = None if settings.certfile is None else tls.server_context(
        settings.certfile, settings.keyfile, settings.ca_certs)
    try:
        drop_privileges(config.worker.user, config.worker.group)
    except OSError as exc:
        log.error("worker %d cannot switch to [worker] user/group: %s; start the master as "
                  "root, or leave user and group empty", os.getpid(), exc)
        return EXIT_BOOT_ERROR
    try:
        import_task_modules(config.worker.tasks)  # nothing to do once the master imported them
    except TaskModuleError as exc:
        log.error("worker %d %s", os.getpid(), exc, exc_info=exc.__cause__)
        return EXIT_BOOT_ERROR
    # Wrap the master's listener afresh so its watchers belong to this
    # process (as gunicorn's gevent worker does).
    gevent_listener = gevent.socket.socket(fileno=listener.detach())
    max_tasks = config.worker.max_tasks_per_child
    if max_tasks:
        max_tasks += random.randint(0, config.worker.max_tasks_jitter)
    slot = scoreboard.slot(slot_index)  # type: ignore[attr-defined]
    Worker(gevent_listener, config, default_registry, master_pid, slot, max_tasks,
           ssl_context).serve_forever()
    return EXIT_OK
