"""The WebSocket gateway: ``gunicorn -k geventwebsocket.gunicorn.workers.GeventWebSocketWorker
greentask.ws:app``.

Theory of operation
-------------------
A thin WSGI app. ``GET /ws`` is a WebSocket (gevent-websocket's handshake,
:mod:`greentask.gateway.handshake`, then wsproto's frames,
:mod:`greentask.gateway.frames`), whose messages
:class:`~greentask.gateway.relay.Relay` sends to the task servers and whose
answers it sends back. ``GET /`` is a demo page,
``GET /healthz`` says whether a task server answers and ``GET /metrics``
serves Prometheus metrics (:mod:`greentask.gateway.metrics`).

The settings are the ``[gateway]`` section of the file named by
``GREENTASK_CONFIG`` (default ``conf/worker.ini``), read when this module is
imported, in the gunicorn worker.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

from greentask.config import Config, check_gateway_tls, load
from greentask.errors import ConfigError, GreentaskError
from greentask.gateway import handshake, metrics
from greentask.gateway.admission import CALLER_KEY, SocketAdmission, load_authorize
from greentask.gateway.panels import Panels
from greentask.gateway.relay import Relay

log = logging.getLogger("greentask.gateway")

#: Config file read when ``GREENTASK_CONFIG`` is not set.
DEFAULT_CONFIG = "conf/worker.ini"
#: Seconds /healthz waits for a task server's echo.
HEALTH_TIMEOUT = 2.0
#: The most of a dashboard cancel's body read (it names one task).
CANCEL_BODY_MAX = 4096

StartResponse = Callable[..., Any]


class Gateway:
    """The WSGI application; one per gunicorn worker process."""

    def __init__(self, config: Config) -> None:
        check_gateway_tls(config)
        self.settings = config.gateway
        self.relay = Relay(self.settings, config.worker.debug)
        static = resources.files("greentask.gateway").joinpath("static")
        self.page = static.joinpath("index.html").read_bytes()
        self.dashboard = static.joinpath("dashboard.html").read_bytes()
        self.icon = static.joinpath("favicon.svg").read_bytes()
        #: The chart library the dashboard uses, shipped with its license (uplot/).
        self.assets = {
            "/static/uplot.js": (static.joinpath("uplot/uPlot.iife.min.js").read_bytes(),
                                 "text/javascript; charset=utf-8"),
            "/static/uplot.css": (static.joinpath("uplot/uPlot.min.css").read_bytes(),
                                  "text/css; charset=utf-8")}
        self.panels = Panels(self.settings.mail_catcher, self.settings.status_servers,
                             self.settings.auth_token_file)
        self.admission = SocketAdmission(self.settings.allowed_origins,
                                         self.settings.allow_no_origin,
                                         load_authorize(self.settings.authorize))
        handshake.install(handshake.Policy(
            self.settings.max_message, self.settings.compression,
            self.settings.compression_window_bits, self.admission.check))

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        socket = environ.get("wsgi.websocket")
        if path == "/ws" and socket is not None:
            self.relay.serve_socket(socket)
            return []
        if path == "/ws":
            return self._reply(start_response, "400 Bad Request", b"/ws is a WebSocket\n")
        if path == "/":
            return self._reply(start_response, "200 OK", self.page, "text/html; charset=utf-8")
        if path == "/favicon.ico":
            return self._reply(start_response, "200 OK", self.icon, "image/svg+xml")
        if path == "/metrics":
            return self._reply(start_response, "200 OK", metrics.render(),
                               "text/plain; version=0.0.4; charset=utf-8")
        if path == "/mailbox":
            return self._reply(start_response, *self.panels.mailbox(), "application/json")
        if path in ("/dashboard", "/dashboard/status"):
            refusal = self.admission.check_caller(environ)
            if refusal is not None:
                return self._reply(start_response, *refusal)
            if path == "/dashboard":
                return self._reply(start_response, "200 OK", self.dashboard,
                                   "text/html; charset=utf-8")
            return self._reply(start_response, *self.panels.statuses(), "application/json")
        if path == "/dashboard/cancel":
            return self._cancel(environ, start_response)
        if path in self.assets:
            return self._reply(start_response, "200 OK", *self.assets[path])
        if path == "/healthz":
            healthy = self.healthy()
            return self._reply(start_response, "200 OK" if healthy else "503 Service Unavailable",
                               b"ok\n" if healthy else b"no task server answers\n")
        return self._reply(start_response, "404 Not Found", b"not found\n")

    def _cancel(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        # A write: the page's origin as well as the caller, so that another
        # site's page cannot make a visitor's browser cancel tasks.
        if environ.get("REQUEST_METHOD") != "POST":
            return self._reply(start_response, "405 Method Not Allowed",
                               b"POST /dashboard/cancel, from the dashboard\n")
        refusal = self.admission.check(environ)
        if refusal is not None:
            return self._reply(start_response, *refusal)
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        body = environ["wsgi.input"].read(min(length, CANCEL_BODY_MAX))
        log.info("%s cancels %s from the dashboard", environ.get(CALLER_KEY), body[:200])
        return self._reply(start_response, *self.panels.cancel(body), "application/json")

    @staticmethod
    def _reply(start_response: StartResponse, status: str, body: bytes,
               content_type: str = "text/plain; charset=utf-8") -> list[bytes]:
        start_response(status, [("Content-Type", content_type),
                                ("Content-Length", str(len(body)))])
        return [body]

    def healthy(self) -> bool:
        """True when a task server answers ``echo``."""
        try:
            self.relay.client.apply("echo", ["health"], timeout=HEALTH_TIMEOUT).get(HEALTH_TIMEOUT)
        except GreentaskError:
            return False
        return True

#: The exit status of a gunicorn worker that cannot boot: gunicorn then stops
#: instead of starting it again and again.
WORKER_BOOT_ERROR = 3


def load_app() -> Gateway:
    """The gateway of ``GREENTASK_CONFIG``; a wrong setting is one line on stderr and exit 3."""
    # greentask's lines go where gunicorn's go, in its format: without this
    # only WARNING and above reach stderr, unformatted (logging's last resort).
    gunicorn_log = logging.getLogger("gunicorn.error")
    ours = logging.getLogger("greentask")
    if gunicorn_log.handlers and not ours.handlers:
        ours.handlers = list(gunicorn_log.handlers)
        ours.setLevel(gunicorn_log.level)
        ours.propagate = False
    try:
        return Gateway(load(os.environ.get("GREENTASK_CONFIG", DEFAULT_CONFIG)))
    except ConfigError as exc:
        print(f"greentask gateway: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(WORKER_BOOT_ERROR) from None


app = load_app()
