"""A forked worker's life: reinit gevent, drop privileges, import the tasks, serve.

:func:`run_worker` is what a child of the master runs, once forked; see
:mod:`greentask.daemon.preload` for what the master prepared for it.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import pwd
import random
import socket

from greentask.config import Config, set_current
from greentask.daemon.lifecycle import EXIT_BOOT_ERROR, EXIT_OK, set_process_title
from greentask.daemon.scoreboard import Scoreboard
from greentask.daemon.taskcode import TaskModuleError, import_task_modules
from greentask.errors import ConfigError

log = logging.getLogger("greentask.worker")


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
               board: Scoreboard, slot_index: int) -> int:
    """Import the tasks (unless the master did), serve until stopped; return the exit status."""
    import gevent
    import gevent.socket

    # The master has no hub, unless task code made one at import; after a
    # raw fork gevent needs this before the child runs it.
    gevent.reinit()

    from greentask import tls
    from greentask.daemon.server import ProcessServer
    from greentask.daemon.spread import AcceptSpread
    from greentask.registry import default_registry

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
        config.check_sections()  # the sections they declare (the master checked, if it imported)
    except (TaskModuleError, ConfigError) as exc:
        log.error("worker %d %s", os.getpid(), exc, exc_info=exc.__cause__)
        return EXIT_BOOT_ERROR
    # Wrap the master's listener afresh so its watchers belong to this
    # process (as gunicorn's gevent worker does).
    gevent_listener = gevent.socket.socket(fileno=listener.detach())
    max_tasks = config.worker.max_tasks_per_child
    if max_tasks:
        max_tasks += random.randint(0, config.worker.max_tasks_jitter)
    ProcessServer(gevent_listener, config, default_registry, master_pid,
                  board.slot(slot_index), max_tasks, ssl_context,
                  spread=AcceptSpread(board, slot_index),
                  activity=board.activity.of(slot_index)).serve_forever()
    return EXIT_OK
