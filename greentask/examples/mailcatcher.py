"""A development mail catcher: an SMTP server that keeps what it is sent, and shows it.

``scripts/run`` starts it under supervisord, and the shipped ``[smtp]``
points at it, so the seed's scenario (an e-mail to each of 1,000 users)
delivers for real out of the box and the demo page can show the messages
arrive. Nothing leaves the machine: every message is accepted, counted, and
only the last ``--keep`` are held (in memory). Point ``[smtp]`` at a real
server to send real mail (docs/deployment.md).

    python -m greentask.examples.mailcatcher [-c conf/worker.ini]

It listens where the config says the tasks send and the gateway reads:
``[smtp] host`` and ``port`` (SMTP), ``[gateway] mail_catcher`` (HTTP), with
the ``GREENTASK_*`` environment applied as for the daemon; ``--smtp`` and
``--http`` (HOST:PORT) override them.

``GET /messages`` on the HTTP address answers JSON: ``{"count": N,
"recipients": M, "recent": [{"to": [...], "from": ..., "subject": ...,
"received": UNIX_TIME}, ...]}``, newest first.
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import sys
import threading
import time
from email.parser import BytesHeaderParser
from email.policy import default
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller

from greentask.address import parse_address
from greentask.config import load
from greentask.errors import ConfigError
from greentask.examples import mail_settings  # noqa: F401 (declares [smtp], read below)


class Mailbox:
    """aiosmtpd handler: accepts every message, counts it, keeps the last ``keep``."""

    def __init__(self, keep: int = 20) -> None:
        self.count = 0
        self.recipients = 0
        self.recent: collections.deque[dict[str, Any]] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        self._headers = BytesHeaderParser(policy=default)

    async def handle_DATA(self, server: object, session: object, envelope: Any) -> str:
        headers = self._headers.parsebytes(envelope.original_content or envelope.content)
        message = {"to": list(envelope.rcpt_tos), "from": envelope.mail_from,
                   "subject": str(headers.get("Subject", "")), "received": time.time()}
        with self._lock:
            self.count += 1
            self.recipients += len(envelope.rcpt_tos)
            self.recent.appendleft(message)
        return "250 Message accepted for delivery"

    def snapshot(self) -> dict[str, Any]:
        """What ``GET /messages`` answers."""
        with self._lock:
            return {"count": self.count, "recipients": self.recipients,
                    "recent": list(self.recent)}


def http_server(address: tuple[str, int], mailbox: Mailbox) -> ThreadingHTTPServer:
    """The read-only JSON view of ``mailbox``."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?")[0] != "/messages":
                self.send_error(404, "only GET /messages is here")
                return
            body = json.dumps(mailbox.snapshot()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # polled every second by the demo page: not worth a line each

    server = ThreadingHTTPServer(address, Handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", default="conf/worker.ini",
                        help="config file whose [smtp] and [gateway] mail_catcher it serves")
    parser.add_argument("--smtp", help="SMTP address, HOST:PORT (default: [smtp] host:port)")
    parser.add_argument("--http", help="address of GET /messages, HOST:PORT (default: "
                                       "[gateway] mail_catcher)")
    parser.add_argument("--keep", type=int, default=20, help="messages kept to show")
    args = parser.parse_args(argv)
    try:
        # The config is read only for an address the flags do not give.
        config = None if args.smtp and args.http else load(args.config)
        smtp = parse_address(args.smtp) if args.smtp else (config.smtp.host, config.smtp.port)
        http = parse_address(args.http) if args.http else config.gateway.mail_catcher
    except (ConfigError, ValueError) as exc:
        sys.exit(f"mail catcher: {exc}")
    if http is None:
        sys.exit("mail catcher: [gateway] mail_catcher is none; give it an address, or --http")
    mailbox = Mailbox(args.keep)
    # Messages of any size: it is a sink, and send_bulk's bodies are small.
    controller = Controller(mailbox, hostname=smtp[0], port=smtp[1], data_size_limit=0)
    try:
        web = http_server(http, mailbox)
        controller.start()
    except OSError as exc:
        sys.exit(f"mail catcher: cannot listen on SMTP {smtp[0]}:{smtp[1]} and HTTP "
                 f"{http[0]}:{http[1]}: {exc}")
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    threading.Thread(target=web.serve_forever, daemon=True).start()
    print(f"mail catcher: SMTP on {smtp[0]}:{smtp[1]}, GET http://{http[0]}:{http[1]}/messages "
          f"(keeps the last {args.keep})", flush=True)
    stopped.wait()
    web.shutdown()
    controller.stop()


if __name__ == "__main__":
    main()
