"""The seed's scenario: send e-mail, to one user or to a thousand, through ``[smtp]``.

Theory of operation
-------------------
Each worker process keeps a pool of SMTP sessions (:class:`SessionPool`, at
most ``[smtp] max_parallel`` open at once, shared by every task of the
process). ``send_bulk`` runs that many greenlets, each taking a session and
sending message after message on it, so a thousand recipients cost a few
dozen greetings, not a thousand; sessions stay open for the next task.

A message is rendered once per task; each recipient only adds its ``To``
line. Each message is sent as MAIL, RCPT, DATA. If the session turns out to
be broken before DATA (a server that timed an idle session out), it is
reopened and the message sent again: the server cannot have it yet. If the
session breaks during DATA, the server may or may not have accepted the
message, so it is reported as failed, never sent twice. A recipient the
server refuses is reported, not retried. A ``send_bulk`` that sent nothing
failed, and raises (the causes and how many each hit); one that sent some
returns them, with each failure's reason.
"""

from __future__ import annotations

import collections
import re
import smtplib
import time
from collections.abc import Iterator
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from typing import Any

import gevent.pool
from gevent.lock import BoundedSemaphore

from greentask.config import current
from greentask.errors import BadArguments, Cancelled
from greentask.examples import mail_settings  # noqa: F401 (declares [smtp], read below)
from greentask.registry import progress, task

#: Seconds an SMTP connect or command may take.
SMTP_TIMEOUT = 30.0
#: An idle pooled session older than this is closed rather than reused (seconds);
#: servers drop idle sessions (Postfix after 300 s).
SESSION_IDLE_LIMIT = 60.0
#: Addresses that can go into a To line as they are; others take the slow path.
_PLAIN_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~@-]{1,254}")


def build_message(sender: str, subject: str, body: str, to: str | None = None) -> bytes:
    """A plain-text message, as SMTP sends it; raises ``ValueError`` for a bad header."""
    message = EmailMessage(policy=SMTP_POLICY)
    message["From"] = sender
    if to is not None:
        message["To"] = to
    message["Subject"] = subject
    message.set_content(body)
    return message.as_bytes()


class MessageTemplate:
    """One message rendered once; :meth:`for_recipient` adds the ``To`` line."""

    def __init__(self, sender: str, subject: str, body: str) -> None:
        self.sender, self.subject, self.body = sender, subject, body
        self._rendered = build_message(sender, subject, body)

    def for_recipient(self, to: str) -> bytes:
        """The message's bytes, addressed to ``to``; raises ``ValueError`` for a bad address."""
        if _PLAIN_ADDRESS.fullmatch(to):
            return b"To: " + to.encode() + b"\r\n" + self._rendered
        # Non-ASCII or unusual addresses: the email package encodes (or refuses) them.
        return build_message(self.sender, self.subject, self.body, to)


class NotDelivered(Exception):
    """One message was not delivered; the text says why.

    ``session``: the session to go on with (None when it was closed);
    ``unreachable``: no session could be opened at all.
    """

    def __init__(self, reason: str, session: smtplib.SMTP | None,
                 unreachable: bool = False) -> None:
        super().__init__(reason)
        self.session = session
        self.unreachable = unreachable


class SessionPool:
    """At most ``size`` SMTP sessions of this process, kept open between tasks."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._permits = BoundedSemaphore(size)
        self._idle: list[tuple[smtplib.SMTP, float]] = []

    def take(self) -> smtplib.SMTP | None:
        """Wait for a permit; return an idle session, or None (one is opened on first send)."""
        self._permits.acquire()
        now = time.monotonic()
        while self._idle:
            session, since = self._idle.pop()
            if now - since < SESSION_IDLE_LIMIT:
                return session
            _quit(session)
        return None

    def give_back(self, session: smtplib.SMTP | None) -> None:
        """Return the permit, keeping ``session`` (if any) open for the next task."""
        if session is not None:
            self._idle.append((session, time.monotonic()))
        self._permits.release()


def _open_session(settings: Any) -> smtplib.SMTP:
    """A new session, greeted; NotDelivered (unreachable) when the server cannot be reached."""
    try:
        session = smtplib.SMTP(settings.host, settings.port, timeout=SMTP_TIMEOUT)
        session.ehlo_or_helo_if_needed()
    except OSError as exc:
        raise NotDelivered(f"cannot reach the SMTP server {settings.host}:{settings.port}: "
                           f"{type(exc).__name__}: {exc}", None, unreachable=True) from None
    return session


def deliver(session: smtplib.SMTP | None, template: MessageTemplate,
            to: str) -> smtplib.SMTP:
    """Send ``template`` to ``to`` on ``session`` (opening one when None); return the session
    to reuse.

    Raises :class:`NotDelivered`. A session found broken before DATA is
    reopened once; one that breaks during DATA is not: the server may have
    the message already.
    """
    try:
        data = template.for_recipient(to)
    except ValueError as exc:
        raise NotDelivered(f"{to!r} is not an e-mail address that can be sent to ({exc}); "
                           "correct it and send again", session) from None
    sender = template.sender
    settings = current().smtp
    for attempt in (1, 2):
        if session is None:
            session = _open_session(settings)
        try:
            _check(session.mail(sender))
            _check(session.rcpt(to))
        except smtplib.SMTPResponseException as exc:
            if exc.smtp_code != 421:  # 421: the server is closing the session
                raise NotDelivered(_describe(exc), _reset(session)) from None
            session.close()
            session = None
        except OSError:  # disconnected or timed out: nothing was sent yet
            session.close()
            session = None
        else:
            break
        if attempt == 2:
            raise NotDelivered("the SMTP session broke twice before the message was sent",
                               None)
    assert session is not None
    try:
        _check(session.data(data))
    except smtplib.SMTPResponseException as exc:
        raise NotDelivered(_describe(exc), _reset(session)) from None
    except OSError as exc:
        session.close()
        raise NotDelivered(f"the SMTP session broke during DATA ({exc}); the message may or "
                           "may not have been delivered, so it is not sent again", None) from None
    return session


def _check(reply: tuple[int, bytes]) -> None:
    code, text = reply
    if not 200 <= code < 300:
        raise smtplib.SMTPResponseException(code, text)


def _describe(exc: smtplib.SMTPResponseException) -> str:
    return f"{type(exc).__name__}: ({exc.smtp_code}, {exc.smtp_error!r})"


def _reset(session: smtplib.SMTP) -> smtplib.SMTP | None:
    """Clear a refused transaction; the session, or None if that broke it."""
    try:
        session.rset()
        return session
    except (smtplib.SMTPException, OSError):
        session.close()
        return None


def _quit(session: smtplib.SMTP) -> None:
    try:
        session.quit()
    except (smtplib.SMTPException, OSError):
        session.close()


_pool: SessionPool | None = None


def session_pool() -> SessionPool:
    """This process's pool, sized by ``[smtp] max_parallel``."""
    global _pool
    if _pool is None:
        _pool = SessionPool(current().smtp.max_parallel)
    return _pool


#: The subject of a message sent without one (the seed's calls give none).
DEFAULT_SUBJECT = "(no subject)"


@task
def send_mail(to: str, subject: str = DEFAULT_SUBJECT, body: str | None = None, *,
              contents: str | None = None, **sender: str) -> dict[str, Any]:
    """Send one message; returns ``{"sent": 1}``.

    Also takes the seed's (Workerman's) argument names, so its calls work
    unchanged: ``{"from": ..., "to": ..., "contents": ...}``; ``from`` is the
    sender (else ``[smtp] sender``), ``contents`` the body.
    """
    unknown = sender.keys() - {"from"}
    if unknown:
        raise BadArguments(f"unexpected argument(s) {sorted(unknown)}; send_mail takes to, "
                           "subject, body (or the seed's from, to, contents)")
    if body is None and contents is None:
        raise BadArguments("send_mail needs the message: body (or the seed's contents)")
    if body is not None and contents is not None:
        raise BadArguments("give body or contents, not both (they are the same thing)")
    pool = session_pool()
    template = MessageTemplate(sender.get("from") or current().smtp.sender, subject,
                               body if body is not None else str(contents))
    session = pool.take()
    try:
        session = deliver(session, template, to)
    except NotDelivered as exc:
        session = exc.session
        raise RuntimeError(f"not delivered to {to}: {exc}") from None
    finally:
        pool.give_back(session)
    return {"sent": 1}


@task
def send_bulk(recipients: list[str], subject: str, body: str) -> dict[str, Any]:
    """Send one message to each recipient, concurrently; report ``{"done", "total", "failed"}``.

    Returns ``{"sent": n, "total": m, "failed": {address: reason}}`` when at
    least one message was sent (a partial failure is a result, with each
    reason). When none was, it raises: nothing was delivered, so the call
    failed, and its message names the causes and how many each hit.

    Cancelled, it starts no new message, lets the ones being sent finish
    (never cutting a message off in the middle of DATA), and raises
    ``Cancelled`` with the same counts as its result.
    """
    if not isinstance(recipients, list) or not all(isinstance(r, str) for r in recipients):
        raise ValueError("recipients must be a list of e-mail addresses (strings)")
    pool = session_pool()
    template = MessageTemplate(current().smtp.sender, subject, body)
    total = len(recipients)
    pending = iter(recipients)
    failed: dict[str, str] = {}
    done = 0
    stopping = False

    def work() -> None:
        nonlocal done
        session = pool.take()
        try:
            while not stopping:
                to = next(pending, None)
                if to is None:
                    break
                try:
                    session = deliver(session, template, to)
                except NotDelivered as exc:
                    session = exc.session
                    failed[to] = str(exc)
                    if exc.unreachable:
                        done += _fail_rest(pending, failed, exc)
                done += 1
                progress({"done": done, "total": total, "failed": len(failed)})
        finally:
            pool.give_back(session)

    sessions = gevent.pool.Group()
    try:
        for _ in range(min(pool.size, total)):
            sessions.spawn(work)
        sessions.join(raise_error=True)
    except Cancelled:
        stopping = True
        sessions.join()  # the messages in flight finish; [worker] cancel_grace bounds it
        raise Cancelled(f"cancelled after {done} of {total} recipients",
                        result={"sent": done - len(failed), "total": total,
                                "failed": failed}) from None
    finally:
        sessions.kill()
    if total and len(failed) == total:
        raise RuntimeError(f"sent none of the {total} message{'' if total == 1 else 's'}: "
                           f"{_causes(failed)}")
    return {"sent": total - len(failed), "total": total, "failed": failed}


def _causes(failed: dict[str, str]) -> str:
    """The reasons recipients failed, most common first, with how many each (at most 3)."""
    counts = collections.Counter(reason.removeprefix("not sent: ") for reason in failed.values())
    shown = [f"{count} recipient(s): {reason}" for reason, count in counts.most_common(3)]
    more = len(counts) - len(shown)
    return "; ".join(shown) + (f"; and {more} other reasons" if more > 0 else "")


def _fail_rest(pending: Iterator[str], failed: dict[str, str], exc: Exception) -> int:
    # The server cannot be reached even after a reconnect: trying the other
    # recipients would only wait out the same error for each of them.
    count = 0
    for to in pending:
        failed[to] = f"not sent: {exc}"
        count += 1
    return count
