"""The seed's scenario: e-mail to 1,000 users through a real SMTP server (aiosmtpd)."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from greentask import TaskClient, TaskError

from .conftest import free_port, wait_until
from .smtp_sink import Inbox

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def smtp_server():
    inbox = Inbox(refuse="nobody@example.org")
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller, inbox
    controller.stop()


def test_send_bulk_delivers_to_1000_users_exactly_once_with_progress(make_daemon, smtp_server):
    controller, inbox = smtp_server
    inbox.delay = 0.02  # the seed's slow mail server; scripts/bench --mail times this
    daemon = make_daemon(smtp={"host": "127.0.0.1", "port": controller.port,
                               "sender": "news@example.org", "max_parallel": 50})
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
    assert seen[-1] == {"done": 1000, "total": 1000, "failed": 0}
    assert [p["done"] for p in seen] == list(range(1, 1001))
    assert inbox.sessions <= 2 * 50  # sessions carry many messages each (two processes)


def test_sessions_are_pooled_across_tasks_and_reopened_when_the_server_dropped_them(
        make_daemon):
    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        daemon = make_daemon(processes=1, smtp={"port": port, "max_parallel": 5})
        with TaskClient([daemon.address], timeout=60) as client:
            first = [f"first{i}@example.org" for i in range(100)]
            assert client.call("send_bulk", first, "s", "b")["sent"] == 100
            assert client.call("send_mail", "one@example.org", "s", "b") == {"sent": 1}
            assert inbox.sessions == 5  # the second task reused the first one's sessions
            controller.stop()  # every pooled session is now dead
            controller = Controller(inbox, hostname="127.0.0.1", port=port)
            controller.start()
            second = [f"second{i}@example.org" for i in range(100)]
            result = client.call("send_bulk", second, "s", "b")
    finally:
        controller.stop()
    assert result == {"sent": 100, "total": 100, "failed": {}}
    assert collections.Counter(inbox.recipients()) == collections.Counter(
        [*first, "one@example.org", *second])


def test_a_session_cut_during_data_is_reported_never_resent(make_daemon, tmp_path):
    inbox = Inbox(cut_after_data="lost-reply@example.org")
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        daemon = make_daemon(processes=1, smtp={"port": controller.port, "max_parallel": 3})
        recipients = [f"u{i}@example.org" for i in range(20)] + ["lost-reply@example.org"]
        with TaskClient([daemon.address], timeout=60) as client:
            result = client.call("send_bulk", recipients, "s", "b")
    finally:
        controller.stop()
    assert result["sent"] == 20
    assert "may or may not have been delivered" in result["failed"]["lost-reply@example.org"]
    assert collections.Counter(inbox.recipients()) == collections.Counter(recipients)


def test_refused_recipient_is_reported_and_the_rest_delivered(make_daemon, smtp_server):
    controller, inbox = smtp_server
    daemon = make_daemon(smtp={"port": controller.port})
    with TaskClient([daemon.address]) as client:
        result = client.call("send_bulk", ["a@example.org", "nobody@example.org",
                                           "x@example.org\r\nBcc: all@example.org",
                                           "b@example.org"], "s", "b")
        assert client.call("send_mail", "c@example.org", "one", "body") == {"sent": 1}
    assert result["sent"] == 2
    assert "550, b'no such user here'" in result["failed"]["nobody@example.org"]
    assert "is not an e-mail address that can be sent to" in \
        result["failed"]["x@example.org\r\nBcc: all@example.org"]
    assert sorted(r for _, rcpts, _ in inbox.messages for r in rcpts) == [
        "a@example.org", "b@example.org", "c@example.org"]


def test_unreachable_smtp_server_fails_clearly(make_daemon):
    # Nothing was sent: the call failed, and says why and how many each cause hit.
    daemon = make_daemon(smtp={"port": free_port()})
    with TaskClient([daemon.address]) as client:
        with pytest.raises(TaskError, match=r"RuntimeError: sent none of the 50 messages: 50 "
                                            r"recipient\(s\): cannot reach the SMTP server "
                                            r".*Connection refused"):
            client.call("send_bulk", [f"u{i}@example.org" for i in range(50)], "s", "b")
        with pytest.raises(Exception, match="ConnectionRefusedError"):
            client.call("send_mail", "a@example.org", "s", "b")
    greentask = str(Path(sys.executable).with_name("greentask"))
    cli = subprocess.run([greentask, "call", "send_bulk", '{"recipients": ["a@example.org"], '
                          '"subject": "s", "body": "b"}', "--server", daemon.address],
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 1 and "sent none of the 1 message: " in cli.stderr
    wait_until(lambda: "[WARNING] task 'send_bulk' (id" in daemon.log(), 10, "the log line")
    assert "raised RuntimeError: sent none of the 50 messages" in daemon.log()


SEED_LINE = b'{"function":"send_mail","args":{"from":"xxx","to":"xxx","contents":"xxx"}}\n'


def test_the_seeds_own_send_mail_calls_work_unchanged(make_daemon, connect, make_gateway):
    import json

    inbox, port = Inbox(), free_port()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        daemon = make_daemon(processes=1, smtp={"port": port})
        # The seed's exact line (json_encode's output, no id) is delivered
        # (the test server takes "xxx" as a local address).
        conn = connect(daemon.port)
        conn.send(SEED_LINE)
        assert conn.read_json() == {"ok": True, "result": {"sent": 1}}
        # With real addresses: from is the sender, contents the body, the
        # subject a default.
        conn.send(SEED_LINE.replace(b'"from":"xxx"', b'"from":"boss@example.org"')
                  .replace(b'"to":"xxx"', b'"to":"user@example.org"')
                  .replace(b'"contents":"xxx"', b'"contents":"your report is ready"'))
        assert conn.read_json() == {"ok": True, "result": {"sent": 1}}
        # The gateway's side of the seed: a browser message runs the same call.
        ws = make_gateway(daemon, expose="send_mail").connect()
        ws.send(json.dumps({"function": "send_mail", "id": 1, "args": {
            "from": "boss@example.org", "to": "ws@example.org", "contents": "from a browser"}}))
        assert json.loads(ws.recv())["event"] == "complete"
    finally:
        controller.stop()
    senders = [(sender, recipients) for sender, recipients, _ in inbox.messages]
    assert senders == [("xxx", ["xxx"]), ("boss@example.org", ["user@example.org"]),
                       ("boss@example.org", ["ws@example.org"])]
    first = inbox.messages[1][2]
    assert b"Subject: (no subject)" in first and b"your report is ready" in first


@pytest.mark.parametrize("args, words", [
    ({"to": "a@example.org", "contents": "x", "sender": "b@example.org"},
     "unexpected argument(s) ['sender']"),
    ({"to": "a@example.org"}, "needs the message: body (or the seed's contents)"),
    ({"to": "a@example.org", "body": "x", "contents": "y"}, "give body or contents, not both"),
])
def test_send_mail_says_which_argument_is_wrong(daemon, connect, args, words):
    reply = connect(daemon.port).call({"function": "send_mail", "args": args, "id": 1})
    assert reply["error"]["type"] == "BadArguments" and words in reply["error"]["message"]
