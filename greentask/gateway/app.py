"""The WebSocket gateway: ``gunicorn -k geventwebsocket.gunicorn.workers.GeventWebSocketWorker
greentask.ws:app``.

Theory of operation
-------------------
A thin WSGI app. ``GET /ws`` is a WebSocket (gevent-websocket's handshake,
:mod:`greentask.gateway.handshake`, then wsproto's frames,
:mod:`greentask.gateway.frames`); each text message is a JSON request
``{"function", "args", "id"}`` and runs in its own greenlet through one
:class:`~greentask.client.TaskClient` per gunicorn worker process (pooled,
pipelined connections to ``[gateway] task_servers``). The greenlet relays
progress as ``{"id", "event": "progress", "progress"}`` and ends with exactly
one ``complete`` or ``error`` event. A message that does not start with ``{`` runs
``default_function`` with its text and is answered with the plain text
``task complete``, as the PHP original does. ``GET /`` is a demo page,
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
import time
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

import gevent
import ujson
from gevent.lock import BoundedSemaphore

from greentask.client import TaskClient, TaskHandle
from greentask.config import Config, check_gateway_tls, load
from greentask.errors import Cancelled, ConfigError, GreentaskError, RemoteError
from greentask.gateway import frames, handshake, metrics
from greentask.gateway.admission import CALLER_KEY, SocketAdmission, load_authorize
from greentask.gateway.panels import Panels
from greentask.gateway.upstream import task_client

log = logging.getLogger("greentask.gateway")

#: Config file read when ``GREENTASK_CONFIG`` is not set.
DEFAULT_CONFIG = "conf/worker.ini"
#: Seconds /healthz waits for a task server's echo.
HEALTH_TIMEOUT = 2.0
#: How often a worker's gateway checks whether gunicorn is stopping it, and
#: closes the sockets idle past ``[gateway] idle_timeout`` (seconds).
WATCH_INTERVAL = 0.5
#: The most of a dashboard cancel's body read (it names one task).
CANCEL_BODY_MAX = 4096

StartResponse = Callable[..., Any]

#: What a browser is told when a task could not be run or did not finish: in
#: words for the person at the page. The detail, with what an operator should
#: do, goes to the gateway's log (and to the browser too with ``debug``).
#: Errors about the request itself (BadArguments, UnknownFunction, ...) keep
#: their message: the page's developer needs it.
BROWSER_WORDS = {
    "TaskError": "the task failed",
    "Timeout": "the task took too long and was stopped",
    "WorkerLost": "the task server stopped while running the task; it may or may not have run",
    "ShuttingDown": "the task server is restarting; try again in a moment",
    "ConnectionFailed": "the task servers cannot be reached right now; try again later",
    "Unauthorized": "this site may not run tasks right now",
    "TooLarge": "the request or its result is too large",
}


def error_event(request_id: Any, kind: str, message: str) -> dict[str, Any]:
    """An ``error`` event for the browser."""
    return {"id": request_id, "event": "error", "error": {"type": kind, "message": message}}


class Gateway:
    """The WSGI application; one per gunicorn worker process."""

    def __init__(self, config: Config) -> None:
        check_gateway_tls(config)
        self.settings = config.gateway
        self.debug = config.worker.debug
        self._client: TaskClient | None = None
        #: Open sockets of this worker process (told 1001 when it stops), each
        #: with when its last message came (closed once idle too long).
        self.sockets: dict[Any, float] = {}
        self._watcher: gevent.Greenlet | None = None
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
        #: Task permits of this process, over all its sockets.
        self.process_permits = BoundedSemaphore(self.settings.max_inflight)
        handshake.install(handshake.Policy(
            self.settings.max_message, self.settings.compression,
            self.settings.compression_window_bits, self.admission.check))

    @property
    def client(self) -> TaskClient:
        """The task client, made on first use (after gunicorn forked this worker)."""
        if self._client is None:
            # Requests of one turn of the loop go out in one send per connection.
            self._client = task_client(self.settings, spawn=gevent.spawn)
        return self._client

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        socket = environ.get("wsgi.websocket")
        if path == "/ws" and socket is not None:
            self.serve_socket(socket)
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
            self.client.apply("echo", ["health"], timeout=HEALTH_TIMEOUT).get(HEALTH_TIMEOUT)
        except GreentaskError:
            return False
        return True

    def serve_socket(self, socket: Any) -> None:
        """Read messages until the browser leaves; each runs in its own greenlet."""
        tasks = SocketTasks(self.settings.max_inflight_per_socket)
        self.sockets[socket] = time.monotonic()
        metrics.SOCKETS_OPENED.inc()
        metrics.SOCKETS_OPEN.inc()
        if self._watcher is None:
            self._watcher = gevent.spawn(self._watch_sockets, socket.handler.server)
            gevent.spawn(self._flush_metrics_forever)
        try:
            self._read_messages(socket, tasks)
        finally:
            self.sockets.pop(socket, None)
            metrics.SOCKETS_OPEN.dec()
            if self.settings.cancel_on_disconnect:
                for handle in list(tasks.handles.values()):
                    handle.cancel()

    @staticmethod
    def _flush_metrics_forever() -> None:
        while True:
            gevent.sleep(metrics.FLUSH_INTERVAL)
            metrics.TALLY.flush()

    def _watch_sockets(self, server: Any) -> None:
        # One sweep for every socket's idle timeout: a timer per receive cost
        # more than the rest of the socket's reading.
        idle_timeout = self.settings.idle_timeout
        while not server.closed:
            gevent.sleep(WATCH_INTERVAL)
            idle_since = time.monotonic() - idle_timeout
            for socket, last_message in list(self.sockets.items()):
                if last_message < idle_since:
                    socket.close(frames.CLOSE_NORMAL, "idle timeout")
        # gunicorn stops a gevent worker by closing its server, then waits up
        # to graceful_timeout for handlers to end: tell each browser at once
        # (1001 going away) so it can reconnect to another worker.
        for socket in list(self.sockets):
            socket.close(frames.CLOSE_GOING_AWAY, "server is stopping")
        metrics.TALLY.flush()

    def _read_messages(self, socket: Any, tasks: SocketTasks) -> None:
        socket_permits = tasks.permits
        sockets = self.sockets
        while True:
            message = socket.receive()
            if message is None:
                break
            sockets[socket] = time.monotonic()
            cancelled = _cancel_id(message)
            if cancelled is not _NOT_A_CANCEL:
                handle = tasks.handles.get(cancelled)
                if handle is not None:
                    handle.cancel()  # its "cancelled" event ends the task's own greenlet
                continue
            if not socket_permits.acquire(blocking=False):
                self._send(socket, error_event(
                    _message_id(message), "Overloaded",
                    f"more than {self.settings.max_inflight_per_socket} tasks in flight on "
                    "this socket; wait for some to complete"))
                continue
            if not self.process_permits.acquire(blocking=False):
                socket_permits.release()
                self._send(socket, error_event(
                    _message_id(message), "Overloaded",
                    "the gateway is running as many tasks as it may; try again in a moment"))
                continue
            # A raw greenlet: nothing joins or kills it, and a Greenlet with
            # its links cost a tenth of the message's time.
            gevent.spawn_raw(self._run_message, socket, message, tasks)
        # Results still coming for this socket are dropped (and counted) in _send.

    def _run_message(self, socket: Any, message: str | bytes, tasks: SocketTasks) -> None:
        try:
            if isinstance(message, bytes):
                message = message.decode("utf-8", "replace")
            if not message.lstrip().startswith("{"):
                self._run_plain(socket, message)
                return
            try:
                request = ujson.loads(message)
            except ValueError as exc:
                self._send(socket, error_event(None, "BadRequest", f"not valid JSON ({exc}); "
                                               'send {"function": ..., "args": ..., "id": ...}'))
                return
            self._run_request(socket, request, tasks)
        finally:
            self.process_permits.release()
            tasks.permits.release()

    def _run_request(self, socket: Any, request: dict[str, Any], tasks: SocketTasks) -> None:
        request_id = request.get("id")
        function, args = request.get("function"), request.get("args")
        if not isinstance(function, str) or function not in self.settings.expose:
            callable_ = ", ".join(self.settings.expose)
            log.info("a browser at %s asked for %r, which [gateway] expose does not list (%s); "
                     "to allow it, add it there and restart the gateway", _peer(socket),
                     function, callable_)
            self._send(socket, error_event(
                request_id, "NotExposed",
                f"{function!r} cannot be called from a browser (it is not in [gateway] "
                f"expose); callable: {callable_}"))
            return
        if args is not None and not isinstance(args, (list, dict)):
            self._send(socket, error_event(request_id, "BadRequest",
                                           '"args" must be an object or an array'))
            return

        def relay(value: Any) -> None:
            self._send(socket, {"id": request_id, "event": "progress", "progress": value})
        handle = self.client.apply(function, args, on_progress=relay)
        if request_id is not None:
            tasks.handles[request_id] = handle
        try:
            result = handle.get()
        except Cancelled as exc:
            self._send(socket, {"id": request_id, "event": "cancelled", "message": exc.message,
                                "result": exc.result})
            return
        except GreentaskError as exc:
            self._send(socket, error_event(request_id, *self._describe(exc, socket, function)))
            return
        finally:
            if tasks.handles.get(request_id) is handle:
                del tasks.handles[request_id]
        self._send(socket, {"id": request_id, "event": "complete", "message": "task complete",
                            "result": result})

    def _run_plain(self, socket: Any, text: str) -> None:
        try:
            self.client.apply(self.settings.default_function, [text]).get()
        except GreentaskError as exc:
            self._send(socket, error_event(
                None, *self._describe(exc, socket, self.settings.default_function)))
            return
        metrics.TALLY.messages["complete"] += 1
        self._send_text(socket, "task complete")

    def _describe(self, exc: GreentaskError, socket: Any, function: str) -> tuple[str, str]:
        """The error's type and what the browser is told; the operator's detail is logged."""
        kind = exc.type if isinstance(exc, RemoteError) else type(exc).__name__
        detail = exc.message if isinstance(exc, RemoteError) else str(exc)
        words = BROWSER_WORDS.get(kind)
        if words is None:
            return kind, detail
        log.warning("task %r for a browser at %s: %s: %s", function, _peer(socket), kind,
                    detail)
        return kind, detail if self.debug else words

    def _send(self, socket: Any, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind != "progress":
            metrics.TALLY.messages[kind if kind != "error" else event["error"]["type"]] += 1
        self._send_text(socket, ujson.dumps(event, ensure_ascii=False))

    def _send_text(self, socket: Any, text: str) -> None:
        if socket.closed:
            metrics.TALLY.dropped += 1
            return
        try:
            socket.send(text)
        except Exception:  # the browser went away mid-send: drop, count, go on
            metrics.TALLY.dropped += 1


class SocketTasks:
    """One browser socket's tasks: the permits they hold, and their handles by the
    browser's id (for a cancel message)."""

    def __init__(self, limit: int) -> None:
        self.permits = BoundedSemaphore(limit)
        self.handles: dict[Any, TaskHandle] = {}


#: What :func:`_cancel_id` returns for a message that is not a cancel.
_NOT_A_CANCEL = object()


def _cancel_id(message: str | bytes) -> Any:
    """The id of a ``{"cancel": ID}`` message, else :data:`_NOT_A_CANCEL`."""
    text = message.decode("utf-8", "replace") if isinstance(message, bytes) else message
    if '"cancel"' not in text[:32]:
        return _NOT_A_CANCEL  # most messages: no parse
    try:
        obj = ujson.loads(text)
    except ValueError:
        return _NOT_A_CANCEL
    if isinstance(obj, dict) and obj.keys() == {"cancel"}:
        return obj["cancel"]
    return _NOT_A_CANCEL


def _peer(socket: Any) -> str:
    """The browser's address, for the log."""
    return str(getattr(socket, "environ", {}).get("REMOTE_ADDR", "?"))


def _message_id(message: str | bytes) -> Any:
    try:
        request = ujson.loads(message)
    except ValueError:
        return None
    return request.get("id") if isinstance(request, dict) else None


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
