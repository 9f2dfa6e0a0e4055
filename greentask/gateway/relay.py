"""The WebSocket message path: browser messages to the task servers, their answers back.

Theory of operation
-------------------
One :class:`Relay` per gunicorn worker process. Each socket's reader
greenlet (:meth:`Relay.serve_socket`) receives messages, checks the socket's
and the process's tasks in flight against ``[gateway] max_inflight_per_socket``
and ``max_inflight``, and sends each message's task through one
:class:`~greentask.client.TaskClient` (pooled, pipelined connections to
``[gateway] task_servers``; the requests of one turn of the loop in one send).
No greenlet waits for a reply: the task's progress is relayed as ``{"id",
"event": "progress", "progress"}`` and its handle's done-callback sends
exactly one ``complete``, ``cancelled`` or ``error`` event, from the task
connection's reader (a browser's frames never make it wait: see
:mod:`~greentask.gateway.frames`). A message that does not start with ``{``
runs ``default_function`` with its text and is answered with the plain text
``task complete``, as the PHP original does.

One sweep every :data:`WATCH_INTERVAL` answers a call whose reply is overdue
(``Timeout``), closes idle sockets and, once gunicorn stops the worker, tells
every socket 1001.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
import ujson

from greentask.client import TaskClient, TaskHandle
from greentask.errors import Cancelled, GreentaskError, RemoteError
from greentask.gateway import frames, metrics
from greentask.gateway.upstream import task_client

log = logging.getLogger("greentask.gateway")

#: How often a worker's gateway checks whether gunicorn is stopping it, closes
#: the sockets idle past ``[gateway] idle_timeout`` and answers overdue calls
#: (seconds).
WATCH_INTERVAL = 0.5

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


class Relay:
    """One gunicorn worker process's sockets and the calls they have in flight."""

    def __init__(self, settings: Any, debug: bool) -> None:
        self.settings = settings
        self.debug = debug
        self._client: TaskClient | None = None
        #: Open sockets of this worker process (told 1001 when it stops), each
        #: with when its last message came (closed once idle too long).
        self.sockets: dict[Any, float] = {}
        #: The calls in flight of this process, over all its sockets, oldest first.
        self.calls: dict[TaskHandle, BrowserCall] = {}
        self._watcher: gevent.Greenlet | None = None

    @property
    def client(self) -> TaskClient:
        """The task client, made on first use (after gunicorn forked this worker)."""
        if self._client is None:
            # Requests of one turn of the loop go out in one send per connection.
            self._client = task_client(self.settings, spawn=gevent.spawn)
        return self._client

    def serve_socket(self, socket: Any) -> None:
        """Read messages until the browser leaves; each one's task is sent from here and
        answered by its handle's done-callback."""
        tasks = SocketTasks()
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
        # One sweep for every socket's idle timeout and every call's deadline:
        # a timer per receive or per call cost more than the rest of a message.
        idle_timeout = self.settings.idle_timeout
        while not server.closed:
            gevent.sleep(WATCH_INTERVAL)
            now = time.monotonic()
            for socket, last_message in list(self.sockets.items()):
                if last_message < now - idle_timeout:
                    socket.close(frames.CLOSE_NORMAL, "idle timeout")
            self._expire_calls(now)
        # gunicorn stops a gevent worker by closing its server, then waits up
        # to graceful_timeout for handlers to end: tell each browser at once
        # (1001 going away) so it can reconnect to another worker.
        for socket in list(self.sockets):
            socket.close(frames.CLOSE_GOING_AWAY, "server is stopping")
        metrics.TALLY.flush()

    def _expire_calls(self, now: float) -> None:
        """Answer the calls no reply came for by their deadline (the oldest come first)."""
        while self.calls:
            handle, call = next(iter(self.calls.items()))
            if call.deadline > now:
                return
            self._answered(handle, call)
            handle.cancel()  # do not leave it running on the task server
            self._send_error(call, handle.no_reply_in(handle.reply_wait))

    def _read_messages(self, socket: Any, tasks: SocketTasks) -> None:
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
                    handle.cancel()  # its "cancelled" event answers the message
                continue
            if tasks.in_flight >= self.settings.max_inflight_per_socket:
                self._send(socket, error_event(
                    _message_id(message), "Overloaded",
                    f"more than {self.settings.max_inflight_per_socket} tasks in flight on "
                    "this socket; wait for some to complete"))
                continue
            if len(self.calls) >= self.settings.max_inflight:
                self._send(socket, error_event(
                    _message_id(message), "Overloaded",
                    "the gateway is running as many tasks as it may; try again in a moment"))
                continue
            self._start_message(socket, message, tasks)
        # Results still coming for this socket are dropped (and counted) in _send.

    def _start_message(self, socket: Any, message: str | bytes, tasks: SocketTasks) -> None:
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        if not message.lstrip().startswith("{"):
            self._call(BrowserCall(socket, tasks, self.settings.default_function, plain=True),
                       [message])
            return
        try:
            request = ujson.loads(message)
        except ValueError as exc:
            self._send(socket, error_event(None, "BadRequest", f"not valid JSON ({exc}); "
                                           'send {"function": ..., "args": ..., "id": ...}'))
            return
        request_id, function, args = request.get("id"), request.get("function"), \
            request.get("args")
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
        self._call(BrowserCall(socket, tasks, function, request_id=request_id), args)

    def _call(self, call: BrowserCall, args: list[Any] | dict[str, Any] | None) -> None:
        """Send the task; its reply answers the browser from the done-callback, so no
        greenlet waits for it."""
        relay = None
        if not call.plain:
            def relay(value: Any) -> None:
                self._send(call.socket, {"id": call.request_id, "event": "progress",
                                         "progress": value}, droppable=True)
        handle = self.client.apply(call.function, args, on_progress=relay)
        call.deadline = time.monotonic() + handle.reply_wait
        call.tasks.in_flight += 1
        if call.request_id is not None and not call.plain:
            call.tasks.handles[call.request_id] = handle
        self.calls[handle] = call
        handle.add_done_callback(self._answer)

    def _answered(self, handle: TaskHandle, call: BrowserCall) -> None:
        del self.calls[handle]
        call.tasks.in_flight -= 1
        if call.tasks.handles.get(call.request_id) is handle:
            del call.tasks.handles[call.request_id]

    def _answer(self, handle: TaskHandle) -> None:
        call = self.calls.get(handle)
        if call is None:
            return  # answered already: its deadline passed
        self._answered(handle, call)
        try:
            result = handle.get(0)
        except Cancelled as exc:
            self._send(call.socket, {"id": call.request_id, "event": "cancelled",
                                     "message": exc.message, "result": exc.result})
        except GreentaskError as exc:
            self._send_error(call, exc)
        else:
            if call.plain:
                metrics.TALLY.messages["complete"] += 1
                self._send_text(call.socket, "task complete")
            else:
                self._send(call.socket, {"id": call.request_id, "event": "complete",
                                         "message": "task complete", "result": result})

    def _send_error(self, call: BrowserCall, exc: GreentaskError) -> None:
        self._send(call.socket, error_event(call.request_id,
                                            *self._describe(exc, call.socket, call.function)))

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

    def _send(self, socket: Any, event: dict[str, Any], droppable: bool = False) -> None:
        kind = event["event"]
        if kind != "progress":
            metrics.TALLY.messages[kind if kind != "error" else event["error"]["type"]] += 1
        self._send_text(socket, ujson.dumps(event, ensure_ascii=False), droppable)

    def _send_text(self, socket: Any, text: str, droppable: bool = False) -> None:
        if socket.closed:
            metrics.TALLY.dropped += 1
            return
        try:
            if not socket.send(text, droppable):
                metrics.TALLY.dropped += 1  # progress, for a browser that does not read
        except OSError:  # the browser went away: drop, count, go on
            metrics.TALLY.dropped += 1



class SocketTasks:
    """One browser socket's tasks: how many are in flight, and their handles by the
    browser's id (for a cancel message)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.handles: dict[Any, TaskHandle] = {}


class BrowserCall:
    """One browser message's task, from its send to its one answer."""

    __slots__ = ("deadline", "function", "plain", "request_id", "socket", "tasks")

    def __init__(self, socket: Any, tasks: SocketTasks, function: str,
                 request_id: Any = None, plain: bool = False) -> None:
        self.socket = socket
        self.tasks = tasks
        self.function = function
        self.request_id = request_id
        #: The seed's plain-text contract: answered "task complete", no events.
        self.plain = plain
        #: When the gateway stops waiting for the reply (monotonic seconds).
        self.deadline = 0.0


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
