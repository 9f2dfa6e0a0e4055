"""What the master prepares before it forks, so its children share it.

The master (:mod:`greentask.daemon.master`) monkey-patches the standard
library, imports gevent, greentask's server, ``[worker] preload`` and (by
default) the task modules, freezes all that for the garbage collector, and
forks. The children share those pages instead of each building its own copy,
and every module they inherit, task code included, already sees gevent's
sockets and locks.
"""

from __future__ import annotations

import gc
import importlib

from greentask.daemon.taskcode import import_listed

#: Modules every worker uses, imported by the master before it forks.
SHARED_MODULES = (
    "greentask.daemon.server", "gevent.socket", "gevent.ssl", "gevent.select", "gevent.selectors",
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
    :mod:`greentask.daemon.master`).
    Raises :class:`TaskModuleError` when one of ``preload`` does not import.
    """
    from gevent import monkey
    monkey.patch_all()
    for name in SHARED_MODULES:
        importlib.import_module(name)
    import_listed(preload, "module", "preload")


def freeze_for_fork() -> None:
    """Hide what the master allocated from the children's garbage collectors.

    A collection in a child would otherwise touch, and so copy, every page
    of the master's objects. Unfreezing first lets the collection free the
    task code a reload replaced.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
