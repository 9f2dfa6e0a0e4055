"""The seed's scenario: send e-mail, to one user or to a thousand, through ``[smtp]``.

``send_bulk`` keeps up to ``[smtp] max_parallel`` SMTP sessions open and sends
many messages on each, so a thousand recipients cost a few connections, not a
thousand greetings. A session that breaks is reopened and the message it was
sending is tried once more; a recipient the server refuses is reported, not
retried.
"""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any

import gevent.pool

from greentask.config import current
from greentask.registry import progress, task

#: Seconds an SMTP connect or command may take.
SMTP_TIMEOUT = 30.0


def build_message(sender: str, to: str, subject: str, body: str) -> EmailMessage:
    """A plain-text message."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message.set_content(body)
    return message


class SmtpSender:
    """One SMTP session, reopened when it breaks."""

    def __init__(self) -> None:
        self.settings = current().smtp
        self._session: smtplib.SMTP | None = None

    def send(self, to: str, subject: str, body: str) -> None:
        """Deliver one message; raises ``smtplib.SMTPException`` or ``OSError``."""
        message = build_message(self.settings.sender, to, subject, body)
        for attempt in (1, 2):
            try:
                if self._session is None:
                    self._session = smtplib.SMTP(self.settings.host, self.settings.port,
                                                 timeout=SMTP_TIMEOUT)
                self._session.send_message(message, self.settings.sender, [to])
                return
            except (smtplib.SMTPServerDisconnected, ConnectionError):
                # The session broke before the server accepted the message.
                self._session = None
                if attempt == 2:
                    raise

    def close(self) -> None:
        """End the session politely."""
        if self._session is not None:
            try:
                self._session.quit()
            except (smtplib.SMTPException, OSError):
                pass
            self._session = None


@task
def send_mail(to: str, subject: str, body: str) -> dict[str, Any]:
    """Send one message; returns ``{"sent": 1}``."""
    sender = SmtpSender()
    try:
        sender.send(to, subject, body)
    finally:
        sender.close()
    return {"sent": 1}


@task
def send_bulk(recipients: list[str], subject: str, body: str) -> dict[str, Any]:
    """Send one message to each recipient, concurrently; report ``{"done", "total"}``.

    Returns ``{"sent": n, "total": m, "failed": {address: reason}}``.
    """
    if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
        raise ValueError("recipients must be a list of e-mail addresses (strings)")
    total = len(recipients)
    pending = iter(recipients)
    failed: dict[str, str] = {}
    done = 0

    def work() -> None:
        nonlocal done
        sender = SmtpSender()
        try:
            for to in pending:
                try:
                    sender.send(to, subject, body)
                except (smtplib.SMTPException, OSError) as exc:
                    failed[to] = f"{type(exc).__name__}: {exc}"
                    if isinstance(exc, OSError) and not isinstance(exc, smtplib.SMTPException):
                        done += _fail_rest(pending, failed, exc)
                done += 1
                progress({"done": done, "total": total})
        finally:
            sender.close()

    sessions = gevent.pool.Group()
    try:
        for _ in range(min(current().smtp.max_parallel, total)):
            sessions.spawn(work)
        sessions.join(raise_error=True)
    finally:
        sessions.kill()
    return {"sent": total - len(failed), "total": total, "failed": failed}


def _fail_rest(pending: Iterator[str], failed: dict[str, str], exc: OSError) -> int:
    # The server cannot be reached even after a reconnect: trying the other
    # recipients would only wait out the same error for each of them.
    count = 0
    for to in pending:
        failed[to] = f"not sent, the SMTP server is unreachable ({exc})"
        count += 1
    return count
