"""``python -m greentask.worker -c conf/worker.ini``: start the task daemon in the foreground.

The design card's entry point; the daemon itself is :mod:`greentask.daemon`.
"""

import sys

from greentask.daemon.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
