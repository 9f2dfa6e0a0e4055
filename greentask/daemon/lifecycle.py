"""What the master and its workers agree on: signals, exit statuses, process titles.

A leaf: standard library only, so both sides import it without importing each other.
"""

from __future__ import annotations

import signal

#: Signals a worker handles (stop gracefully, stop now, reopen logs). The
#: master blocks them across the fork and the worker unblocks them once its
#: handlers are in place, so one sent to a booting worker waits instead of
#: hitting the handler it inherited from the master, which would drop it.
WORKER_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1})
#: Exit status: stopped as asked.
EXIT_OK = 0
#: Exit status: the config, a flag or the address is wrong (argparse uses 2 too).
EXIT_CONFIG = 2
#: Exit status: workers cannot start (a task module does not import).
EXIT_BOOT_ERROR = 3



def set_process_title(title: str) -> None:
    """Show ``title`` in ps and top, when setproctitle is installed."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(title)

