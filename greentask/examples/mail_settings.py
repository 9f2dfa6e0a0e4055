"""The mail example's own settings, ``[smtp]``: a task module declaring its section.

greentask's settings table holds only its own sections; a task module adds
its own with :func:`~greentask.config.declare_section` when it is imported,
and reads it with ``current().smtp``, from the same file and environment
(``GREENTASK_SMTP_PORT``). The mail tasks and the development mail catcher
both import this module.
"""

from __future__ import annotations

from greentask.config import Setting, declare_section
from greentask.config.converters import to_host, to_port, to_positive_int, to_text

SECTION = declare_section(
    __name__,
    Setting("smtp", "host", "127.0.0.1", to_host,
            "SMTP server the mail example tasks send through."),
    Setting("smtp", "port", "2525", to_port,
            "Port of that SMTP server: 2525 is the development mail catcher scripts/run "
            "starts, which keeps what it is sent; a real server listens on 25 or 587."),
    Setting("smtp", "sender", "greentask@localhost", to_text,
            "Envelope and From address of the mail example tasks."),
    Setting("smtp", "max_parallel", "50", to_positive_int,
            "SMTP sessions one worker process keeps open at once, shared by its mail tasks "
            "and reused between them; each sends many messages. 50 is Postfix's default "
            "limit per client."),
)
