"""The seed's scenario: e-mail to 1,000 users through a real SMTP server (aiosmtpd)."""

from __future__ import annotations

import collections
import threading

import pytest
from aiosmtpd.controller import Controller

from greentask import TaskClient

from .conftest import free_port

pytestmark = pytest.mark.timeout(120)


class Inbox:
    """aiosmtpd handler that keeps every envelope it accepts."""

    def __init__(self, refuse: str | None = None) -> None:
        self.refuse = refuse
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.lock = threading.Lock()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address == self.refuse:
            return "550 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp_server():
    inbox = Inbox(refuse="nobody@example.org")
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller, inbox
    controller.stop()


def test_send_bulk_delivers_to_1000_users_exactly_once_with_progress(make_daemon, smtp_server):
    controller, inbox = smtp_server
    daemon = make_daemon(smtp={"host": "127.0.0.1", "port": controller.port,
                               "sender": "news@example.org", "max_parallel": 10})
    recipients = [f"user{i}@example.org" for i in range(1000)]
    seen = []
    with TaskClient([daemon.address], timeout=100) as client:
        result = client.call("send_bulk", recipients=recipients, subject="Hello",
                             body="Your report is ready.", on_progress=seen.append)
    assert result == {"sent": 1000, "total": 1000, "failed": {}}
    delivered = collections.Counter(rcpt for _, rcpts, _ in inbox.messages for rcpt in rcpts)
    assert delivered == collections.Counter(recipients)
    assert {sender for sender, _, _ in inbox.messages} == {"news@example.org"}
    assert b"Subject: Hello" in inbox.messages[0][2]
    assert len(seen) == 1000
    assert seen[-1] == {"done": 1000, "total": 1000}
    assert [p["done"] for p in seen] == list(range(1, 1001))


def test_refused_recipient_is_reported_and_the_rest_delivered(make_daemon, smtp_server):
    controller, inbox = smtp_server
    daemon = make_daemon(smtp={"port": controller.port})
    with TaskClient([daemon.address]) as client:
        result = client.call("send_bulk", ["a@example.org", "nobody@example.org",
                                           "b@example.org"], "s", "b")
        assert client.call("send_mail", "c@example.org", "one", "body") == {"sent": 1}
    assert result["sent"] == 2
    assert "550, b'no such user here'" in result["failed"]["nobody@example.org"]
    assert sorted(r for _, rcpts, _ in inbox.messages for r in rcpts) == [
        "a@example.org", "b@example.org", "c@example.org"]


def test_unreachable_smtp_server_fails_clearly(make_daemon):
    daemon = make_daemon(smtp={"port": free_port()})
    with TaskClient([daemon.address]) as client:
        result = client.call("send_bulk", [f"u{i}@example.org" for i in range(50)], "s", "b")
        assert result["sent"] == 0 and len(result["failed"]) == 50
        assert "Connection refused" in result["failed"]["u0@example.org"]
        with pytest.raises(Exception, match="ConnectionRefusedError"):
            client.call("send_mail", "a@example.org", "s", "b")
