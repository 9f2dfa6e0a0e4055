"""The development mail catcher: real SMTP in, JSON out, shown by the gateway at /mailbox."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from greentask import TaskClient

from .conftest import ROOT

pytestmark = pytest.mark.timeout(90)


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_send_bulk_lands_in_the_catcher_and_the_gateway_shows_it(make_daemon, make_gateway,
                                                                 mail_catcher):
    daemon = make_daemon(smtp={"port": mail_catcher.smtp_port})
    gateway = make_gateway(daemon, mail_catcher=mail_catcher.http_address)
    recipients = [f"user{i}@example.org" for i in range(30)]
    with TaskClient([daemon.address]) as client:
        result = client.call("send_bulk", recipients, "Your report", "It is ready.")
    assert result == {"sent": 30, "total": 30, "failed": {}}
    status, box = get(f"http://127.0.0.1:{gateway.port}/mailbox")
    assert status == 200
    assert (box["count"], box["recipients"]) == (30, 30)
    assert len(box["recent"]) == 20  # the last --keep (20) only
    assert {message["subject"] for message in box["recent"]} == {"Your report"}
    assert {message["to"][0] for message in box["recent"]} <= set(recipients)
    assert box == mail_catcher.messages() | {"recent": box["recent"]}
    # The catcher stops on SIGTERM; the page is then told the mailbox is unreadable
    # (once in the gateway's log, not at every poll).
    mail_catcher.proc.terminate()
    assert mail_catcher.proc.wait(10) == 0
    for _ in range(3):
        status, error = get(f"http://127.0.0.1:{gateway.port}/mailbox")
        assert status == 502 and error == {"error": "the mailbox cannot be read just now"}
    assert gateway.log().count("does not answer") == 1


def test_no_mail_catcher_configured_is_404(daemon, make_gateway):
    gateway = make_gateway(daemon, mail_catcher="none")
    status, error = get(f"http://127.0.0.1:{gateway.port}/mailbox")
    assert status == 404 and "[gateway] mail_catcher" in error["error"]


def test_a_busy_port_is_named_and_the_catcher_exits_1():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "greentask.examples.mailcatcher", "--smtp",
             f"127.0.0.1:{port}", "--http", "127.0.0.1:0"], cwd=ROOT, capture_output=True,
            text=True, timeout=30)
    assert result.returncode == 1
    assert f"cannot listen on SMTP 127.0.0.1:{port}" in result.stderr
