"""A task module whose first import, in a booting worker, sends that worker SIGTERM:
as the master does when it retires a worker that has not finished booting."""

import os
import signal

MARKER = os.environ.get("GREENTASK_TEST_TERM_MARKER")
if MARKER and not os.path.exists(MARKER):
    open(MARKER, "w").close()
    os.kill(os.getpid(), signal.SIGTERM)
