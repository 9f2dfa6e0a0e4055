"""What the gateway's own pages show, relayed from loopback HTTP services.

The demo page's mailbox comes from the development mail catcher's ``GET
/messages`` (``[gateway] mail_catcher``); the dashboard's workers from each
task daemon's ``GET /status`` on its metrics port (``[gateway]
status_servers``). The gateway fetches them so the pages stay same-origin
(no CORS) and so a browser never needs to reach a daemon's port. The
dashboard's Cancel goes the same way, to a daemon's ``POST /cancel``, only to
a daemon listed in ``status_servers`` and with the task servers' token.
"""

from __future__ import annotations

import logging
import urllib.error
import urllib.request
from typing import Any

import gevent.pool
import ujson

log = logging.getLogger("greentask.gateway")

#: Seconds a relay waits for its source, and the most of an answer it relays.
FETCH_TIMEOUT = 2.0
FETCH_MAX = 1024 * 1024


class Source:
    """One HTTP JSON source; a failure is logged once, until it answers again."""

    def __init__(self, what: str, address: tuple[str, int], path: str) -> None:
        self.what = what
        self.address = f"{address[0]}:{address[1]}"
        self.url = f"http://{self.address}{path}"
        self.down = False

    def fetch(self) -> bytes | None:
        """Its answer, or None when it does not answer."""
        try:
            with urllib.request.urlopen(self.url, timeout=FETCH_TIMEOUT) as response:
                body = response.read(FETCH_MAX)
        except OSError as exc:
            if not self.down:  # once, not at every poll of every open page
                log.warning("the %s at %s does not answer: %s", self.what, self.url, exc)
            self.down = True
            return None
        if self.down:
            log.info("the %s at %s answers again", self.what, self.url)
        self.down = False
        return body


class Panels:
    """The mailbox and the dashboard's statuses, as (status line, JSON body)."""

    def __init__(self, mail_catcher: tuple[str, int] | None,
                 status_servers: list[tuple[str, int]], token: str | None = None) -> None:
        self.mail_catcher = (None if mail_catcher is None else
                             Source("mail catcher", mail_catcher, "/messages"))
        self.status_servers = [Source("task daemon's status", address, "/status")
                               for address in status_servers]
        self.token = token

    def mailbox(self) -> tuple[str, bytes]:
        """The mail catcher's messages; 404 without one, 502 while it does not answer."""
        if self.mail_catcher is None:
            return "404 Not Found", _error("no mail catcher here ([gateway] mail_catcher)")
        body = self.mail_catcher.fetch()
        if body is None:
            return "502 Bad Gateway", _error("the mailbox cannot be read just now")
        return "200 OK", body

    def statuses(self) -> tuple[str, bytes]:
        """Each status server's ``greentask status --json``, fetched at once."""
        def one(source: Source) -> dict[str, Any]:
            body = source.fetch()
            address = source.address
            if body is None:
                return {"address": address, "ok": False,
                        "error": "does not answer (is [worker] metrics_bind set there?)"}
            try:
                return {"address": address, "ok": True, "status": ujson.loads(body)}
            except ValueError:
                return {"address": address, "ok": False, "error": "answers, but not with JSON"}

        group = gevent.pool.Group()
        servers = group.map(one, self.status_servers) if self.status_servers else []
        return "200 OK", ujson.dumps({"servers": servers}).encode()

    def cancel(self, body: bytes) -> tuple[str, bytes]:
        """Relay ``{"server", "pid", "key"}`` to that status server's ``POST /cancel``."""
        try:
            wanted = ujson.loads(body)
            address, pid, key = wanted["server"], wanted["pid"], wanted["key"]
        except (ValueError, TypeError, KeyError):
            return "400 Bad Request", _error('send {"server": ADDRESS, "pid": PID, "key": KEY}')
        if not isinstance(address, str) or address not in {
                source.address for source in self.status_servers}:
            return "400 Bad Request", _error(f"{address} is not one of this dashboard's servers")
        request = urllib.request.Request(
            f"http://{address}/cancel", data=ujson.dumps({"pid": pid, "key": key}).encode(),
            method="POST", headers={"Content-Type": "application/json"})
        if self.token is not None:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=FETCH_TIMEOUT) as response:
                return f"{response.status} {response.reason}", response.read(FETCH_MAX)
        except urllib.error.HTTPError as refused:
            log.warning("the task daemon at %s refused a cancel: %s", address, refused)
            return f"{refused.code} {refused.reason}", refused.read(FETCH_MAX)
        except OSError as exc:
            log.warning("the task daemon at %s does not answer a cancel: %s", address, exc)
            return "502 Bad Gateway", _error("that task server does not answer just now")


def _error(message: str) -> bytes:
    return ujson.dumps({"error": message}).encode() + b"\n"
