"""A task module for tests/test_preload.py: it notes which process imports it,
and makes a lock at import time, as modules often do."""

from __future__ import annotations

import os
import threading
import time

from greentask import task

if os.environ.get("GREENTASK_TEST_IMPORT_LOG"):
    with open(os.environ["GREENTASK_TEST_IMPORT_LOG"], "a") as log:
        log.write(f"{os.getpid()}\n")

# Made while the module is imported: it must already be gevent's lock, or a
# task waiting for it would block its whole worker process.
_lock = threading.Lock()


@task
def hold_lock(seconds: float) -> str:
    with _lock:
        time.sleep(seconds)
    return "released"


@task
def take_lock() -> str:
    with _lock:
        return "taken"
