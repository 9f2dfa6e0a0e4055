"""Logging set-up for the master and workers: one line per event, with the pid.

``[worker] logfile`` is standard error by default, or a file that SIGUSR1
reopens, so logrotate can move it away and the processes start a new one.
"""

from __future__ import annotations

import logging
import sys

LOG_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(message)s"


class ReopenableFileHandler(logging.FileHandler):
    """A file handler whose file can be closed and opened again by path."""

    def reopen(self) -> None:
        """Open the file again (a new one, when logrotate moved the old away)."""
        self.acquire()
        try:
            stream = self._open()
            if self.stream is not None:
                self.stream.close()
            self.stream = stream
        finally:
            self.release()


def setup_logging(level: int, logfile: str | None) -> None:
    """Log at ``level`` to ``logfile``, or to standard error when it is None."""
    handler: logging.Handler = ReopenableFileHandler(logfile) if logfile else \
        logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def reopen_log_files() -> None:
    """Reopen every log file of this process (on SIGUSR1)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, ReopenableFileHandler):
            try:
                handler.reopen()
            except OSError as exc:
                logging.getLogger("greentask").error(
                    "cannot reopen log file %s: %s; still writing to the old one",
                    handler.baseFilename, exc.strerror)
