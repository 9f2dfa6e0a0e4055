"""TaskClient: call tasks on greentask servers over persistent, pipelined connections.

Theory of operation
-------------------
The client keeps up to ``connections_per_server`` connections to each server
in its list, opened on first use. Each request gets an id unique on its
connection and is written with one ``sendall``; a reader thread per connection
matches reply lines to waiting :class:`TaskHandle` objects by id, so any number
of callers share one connection. The client uses only ``socket`` and
``threading``: in a gevent-monkey-patched process those are gevent's, so it
works from greenlets as well as from plain threads.

Failures: a server that refuses connections is skipped for
:data:`DOWN_RETRY_DELAY` seconds and the next one is tried. A request that
could not be written completely never reached a server, and is sent
elsewhere. A request that was sent but whose connection died before the
reply raises :class:`WorkerLost`, unless the caller said the task may run
twice (``retry=True``). A ``ShuttingDown`` answer means the task did not run,
so it is always sent again on another connection; so does a TLS server's
refusal of the client's certificate, which comes before it reads anything.

TLS: OpenSSL forbids using one ``SSL`` object from two threads at once, and
a reader thread plus writing callers would. A TLS connection therefore puts
its socket in non-blocking mode and makes every TLS call under one lock
(:class:`greentask.tls.SharedTLSStream`), waiting with ``poll`` outside it.
"""

from __future__ import annotations

import enum
import functools
import itertools
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from greentask.address import parse_address
from greentask.errors import (
    Cancelled,
    ConnectionFailed,
    GreentaskError,
    ShuttingDown,
    TaskTimeout,
    Unauthorized,
    WorkerLost,
)
from greentask.protocol import (
    LineDecoder,
    Reply,
    encode_cancel,
    encode_hello,
    encode_request,
    parse_reply,
)
from greentask.tls import SharedTLSStream, is_handshake_refusal

log = logging.getLogger("greentask.client")

#: Seconds a server that refused a connection is skipped before it is tried again.
DOWN_RETRY_DELAY = 1.0
#: Longest reply line the client accepts (64 MiB).
MAX_REPLY_LINE = 64 * 1024 * 1024
#: Seconds a call waits past its own timeout for the server's Timeout reply.
REPLY_MARGIN = 1.0
#: Seconds a failed send waits for the connection's reader to learn why (a TLS
#: alert, a reset), so the error names the cause rather than a broken pipe.
SEND_FAILURE_GRACE = 0.5
#: Times one request may be sent (failover, ShuttingDown, retry=True) before it fails.
MAX_ATTEMPTS = 5

ProgressCallback = Callable[[Any], None]


class Unanswered(enum.Enum):
    """Why a connection gives a request back to its client without a reply."""

    #: The server refused the connection before reading anything (a TLS
    #: certificate check): the task did not run.
    REFUSED = "refused"
    #: The server answered ShuttingDown: the task did not run.
    SHUTTING_DOWN = "shutting down"
    #: The connection died after the request was sent: the task may have run.
    LOST = "lost"


class TaskHandle:
    """A submitted task (a future): :meth:`get` waits for its result."""

    def __init__(self, function: str, args: list[Any] | dict[str, Any], timeout: float,
                 retry: bool, on_progress: ProgressCallback | None) -> None:
        self.function = function
        self.args = args
        self.timeout = timeout
        self.retry = retry
        self.on_progress = on_progress
        #: Times the client has sent it (failover, ShuttingDown, retry=True).
        self.attempts = 0
        self._done = threading.Event()
        self._result: Any = None
        self._error: BaseException | None = None
        #: Sends the cancel line on the connection that carries it (set once sent).
        self._send_cancel: Callable[[], None] | None = None
        self.cancelled = False

    def cancel(self) -> None:
        """Ask the server to cancel the task, and return at once.

        :meth:`get` then raises :class:`Cancelled` (with ``.result`` when the
        task reported what it had done), unless the task finished first.
        Does nothing once the task is done.
        """
        if self.done():
            return
        self.cancelled = True
        send_cancel = self._send_cancel
        if send_cancel is not None:
            send_cancel()

    def done(self) -> bool:
        """True once the result or the error is in."""
        return self._done.is_set()

    def get(self, timeout: float | None = None) -> Any:
        """Wait for the result and return it, or raise the task's error.

        Raises :class:`RemoteError` (or a subclass such as :class:`TaskError`)
        for an error reply, :class:`TaskTimeout` when nothing came within
        ``timeout`` (default: the call's timeout, plus :data:`REPLY_MARGIN`),
        :class:`WorkerLost` or
        :class:`ConnectionFailed`.
        """
        # By default wait a little past the timeout the server enforces, so its
        # Timeout reply (which names the task's limit) arrives first.
        wait = self.timeout + REPLY_MARGIN if timeout is None else timeout
        if not self._done.wait(wait):
            raise TaskTimeout(f"no reply to task {self.function!r} within {wait:g} s; the "
                              "server may still be running it")
        if self._error is not None:
            raise self._error
        return self._result

    def _resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        self._result, self._error = result, error
        self._done.set()

    def _progress(self, value: Any) -> None:
        if self.on_progress is None:
            return
        try:
            self.on_progress(value)
        except Exception:
            log.exception("on_progress callback of task %r raised", self.function)


class _SendFailed(Exception):
    """The request was not written completely: no server has it."""


#: What a connection calls with a request it gives back unanswered.
GiveBack = Callable[[TaskHandle, Unanswered, str], None]


class _Connection:
    """One persistent connection and the thread that reads its replies.

    A request it cannot answer goes back to its client through ``give_back``;
    the client alone decides whether to send it again.
    """

    def __init__(self, address: tuple[str, int], connect_timeout: float, give_back: GiveBack,
                 auth_token: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.address = address
        self._give_back = give_back
        self.sock = socket.create_connection(address, timeout=connect_timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_context is None:
            self.sock.settimeout(None)
            self._recv, self._sendall = self.sock.recv, self.sock.sendall
        else:
            try:
                # The handshake runs within connect_timeout, still blocking.
                self.sock = ssl_context.wrap_socket(self.sock, server_hostname=address[0])
            except OSError:
                self.sock.close()
                raise
            stream = SharedTLSStream(self.sock)
            self._recv, self._sendall = stream.recv, stream.sendall
        if auth_token is not None:
            # No reply on success: requests may follow at once.
            self._sendall(encode_hello(auth_token))
        self.alive = True
        self.draining = False
        #: Why the connection ended, once it has.
        self.closed_because = ""
        #: The server's Unauthorized, once it refused this connection's token.
        self._refusal: Unauthorized | None = None
        self._pending: dict[int, TaskHandle] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._reader_done = threading.Event()
        threading.Thread(target=self._read_loop, name=f"greentask-reader-{address[1]}",
                         daemon=True).start()

    @property
    def usable(self) -> bool:
        """True while new requests may be sent on it."""
        return self.alive and not self.draining

    def send(self, handle: TaskHandle) -> None:
        """Write ``handle``'s request; raises :class:`_SendFailed` when it was not."""
        with self._lock:
            if self._refusal is not None:
                # The same token would be refused on any connection.
                raise Unauthorized(self._refusal.message)
            if not self.alive or self.draining:
                # Checked under the lock the close is decided under: a request
                # is either pending before the close, or never written here.
                raise _SendFailed(self.closed_because or "the server is closing this "
                                  "connection")
            request_id = next(self._ids)
            line = encode_request(handle.function, handle.args, request_id,
                                  progress=handle.on_progress is not None,
                                  timeout=handle.timeout)
            self._pending[request_id] = handle
            try:
                self._sendall(line)
            except OSError as exc:
                del self._pending[request_id]
                # Dead, though the reader may not have seen it yet: send no more here.
                self.draining = True
                failure = str(exc)
            else:
                handle._send_cancel = functools.partial(self._cancel, request_id)
                if handle.cancelled:  # cancelled while it was being sent
                    self._cancel_locked(request_id)
                return
        self._reader_done.wait(SEND_FAILURE_GRACE)
        raise _SendFailed(self.closed_because or failure)

    def _cancel(self, request_id: int) -> None:
        with self._lock:
            self._cancel_locked(request_id)

    def _cancel_locked(self, request_id: int) -> None:
        if not self.alive or request_id not in self._pending:
            return  # answered already, or lost with the connection
        try:
            self._sendall(encode_cancel(request_id))
        except OSError:
            pass  # the reader sees the connection die and gives the request back

    def close(self) -> None:
        """Close; the reader fails whatever is still pending."""
        try:
            # The plain socket's shutdown: SSLSocket's would drop its TLS object
            # under the reader's feet.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def _read_loop(self) -> None:
        decoder = LineDecoder(MAX_REPLY_LINE)
        reason = "closed by the server"
        received = refused = False
        try:
            while not decoder.too_large:
                data = self._recv(65536)
                if not data:
                    break
                received = True
                for line in decoder.feed(data):
                    self._dispatch(parse_reply(line))
            else:
                reason = f"a reply line was longer than {MAX_REPLY_LINE} bytes"
        except ssl.SSLError as exc:
            # Under TLS 1.3 the server checks the client's certificate after
            # the client's side of the handshake is done: its refusal arrives
            # as an alert here, and it read none of our requests.
            refused = not received and is_handshake_refusal(exc)
            reason = f"TLS: {exc.reason or exc}" + (
                " (the server requires a client certificate it accepts: [gateway] certfile "
                "and keyfile for the gateway and greentask call, or certfile and keyfile "
                "for greentask.tls.client_context)" if refused else "")
        except OSError as exc:
            reason = str(exc)
        finally:
            self._fail_pending(reason, refused)
            self._reader_done.set()

    def _dispatch(self, reply: Reply) -> None:
        if reply.kind == "closing":
            # The server answers what it has read, then waits for us to close.
            self.draining = True
            self._close_if_done()
            return
        with self._lock:
            if reply.kind == "progress":
                handle = self._pending.get(reply.id)  # type: ignore[arg-type]
            elif reply.id is not None:
                handle = self._pending.pop(reply.id, None)  # type: ignore[arg-type]
            elif self._pending:
                # A plain Text protocol server echoes no id and answers in order.
                handle = self._pending.pop(next(iter(self._pending)))
            else:
                handle = None
        if reply.kind == "error" and isinstance(reply.value, Unauthorized):
            # The server runs nothing before a good token, and closes: every
            # request of this connection gets the same answer, even one sent
            # before this line arrived.
            self._refusal = reply.value
            self.draining = True
        if handle is None:
            if self.draining:
                self._close_if_done()
            return
        if reply.kind == "progress":
            handle._progress(reply.value)
            return
        if reply.kind == "result":
            handle._resolve(reply.value)
        elif isinstance(reply.value, ShuttingDown):
            # The task did not run: send nothing more here.
            self.draining = True
            self._give_back(handle, Unanswered.SHUTTING_DOWN, str(reply.value))
        else:
            handle._resolve(error=reply.value)
        if self.draining:
            self._close_if_done()

    def _close_if_done(self) -> None:
        with self._lock:
            if not self._pending:
                self.close()

    def _fail_pending(self, reason: str, refused: bool = False) -> None:
        with self._lock:
            self.alive = False
            self.closed_because = reason
            lost = list(self._pending.values())
            self._pending.clear()
        self.sock.close()
        if self._refusal is not None:
            for handle in lost:
                handle._resolve(error=Unauthorized(self._refusal.message))
            return
        cause = Unanswered.REFUSED if refused else Unanswered.LOST
        for handle in lost:
            self._give_back(handle, cause, reason)


class TaskClient:
    """Calls tasks on one or more greentask servers; safe to share between greenlets and threads.

    ``servers``: ``"HOST:PORT"`` strings, tried in turn (round-robin, and on
    failure the next one). ``timeout``: default seconds a call waits for its
    result; also sent to the server, which stops the task after it.
    ``auth_token``: the servers' shared token, when they require one.
    ``ssl_context``: speak TLS (see :func:`greentask.tls.client_context`);
    the server's certificate is checked against the host name in ``servers``.
    """

    def __init__(self, servers: Iterable[str] = ("127.0.0.1:12345",), timeout: float = 30.0,
                 connect_timeout: float = 5.0, connections_per_server: int = 2,
                 auth_token: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.servers = [_parse_server(server) for server in servers]
        if not self.servers:
            raise ValueError("TaskClient needs at least one server, such as '127.0.0.1:12345'")
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._auth_token = auth_token
        self._ssl_context = ssl_context
        self._target = connections_per_server * len(self.servers)
        self._connections: list[_Connection] = []
        self._down_until: dict[tuple[str, int], float] = {}
        self._server_turn = itertools.count()
        self._connection_turn = itertools.count()
        self._lock = threading.Lock()
        self._closed = False

    def call(self, function: str, /, *args: Any, retry: bool = False,
             timeout: float | None = None, on_progress: ProgressCallback | None = None,
             **kwargs: Any) -> Any:
        """Run ``function`` on a server and return its result, or raise its error.

        Positional or keyword arguments (not both) are the task's; ``retry``,
        ``timeout`` and ``on_progress`` are the call's own (see :meth:`submit`).
        """
        handle = self.submit(function, *args, retry=retry, timeout=timeout,
                             on_progress=on_progress, **kwargs)
        try:
            return handle.get()
        except TaskTimeout:
            # No reply in time: do not leave it running on the server.
            handle.cancel()
            raise

    def submit(self, function: str, /, *args: Any, retry: bool = False,
               timeout: float | None = None, on_progress: ProgressCallback | None = None,
               **kwargs: Any) -> TaskHandle:
        """Send a task and return at once; ``handle.get()`` waits for the result.

        ``retry=True`` says the task is safe to run twice: if its connection
        dies before the reply, it is sent again to another server.
        ``on_progress(value)`` is called for each progress line, from the
        connection's reader: keep it short.
        """
        if args and kwargs:
            raise TypeError("pass the task's arguments by position or by keyword, not both")
        return self.apply(function, kwargs or list(args), retry=retry, timeout=timeout,
                          on_progress=on_progress)

    def apply(self, function: str, args: list[Any] | dict[str, Any] | None = None, *,
              retry: bool = False, timeout: float | None = None,
              on_progress: ProgressCallback | None = None) -> TaskHandle:
        """Like :meth:`submit`, with the task's arguments as one list or dict.

        Use it when the arguments are data already, or when a task has an
        argument named ``retry``, ``timeout`` or ``on_progress``.
        """
        if args is not None and not isinstance(args, (list, dict)):
            raise TypeError(f"args must be a list or a dict, not {type(args).__name__}")
        handle = TaskHandle(function, args or [], self.timeout if timeout is None else timeout,
                            retry, on_progress)
        self._send(handle)
        return handle

    def close(self) -> None:
        """Close every connection; calls still waiting raise :class:`WorkerLost`."""
        with self._lock:
            self._closed = True
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()

    def __enter__(self) -> TaskClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _take_back(self, handle: TaskHandle, cause: Unanswered, reason: str) -> None:
        """The one retry policy: a request a connection gave back unanswered.

        One that did not run (refused, ShuttingDown) is always sent again; one
        whose connection died after it was sent only with ``retry=True``.
        """
        if handle.cancelled:
            handle._resolve(error=Cancelled(
                f"task {handle.function!r} was cancelled; it was not sent again ({reason})"))
            return
        if cause is Unanswered.LOST and not handle.retry:
            handle._resolve(error=WorkerLost(
                f"connection to the task server closed before task {handle.function!r} "
                f"answered ({reason}); it may or may not have run. Pass retry=True for tasks "
                "that are safe to run twice"))
            return
        # A server's own "no" (refused, ShuttingDown) names the cause best if
        # every attempt after it fails too.
        self._send(handle, "" if cause is Unanswered.LOST else reason)

    def _send(self, handle: TaskHandle, refusal: str = "") -> None:
        """Send ``handle`` on some connection; ``refusal``: why a server just refused it."""
        last_error = ""
        while handle.attempts < MAX_ATTEMPTS:
            handle.attempts += 1
            try:
                self._connection().send(handle)
                return
            except _SendFailed as exc:
                last_error = str(exc)
                continue
            except GreentaskError as exc:
                handle._resolve(error=exc)
                return
        # A refusal says more than the send that failed after it on a
        # connection the same server had already closed.
        handle._resolve(error=ConnectionFailed(
            f"task {handle.function!r} could not be delivered after {MAX_ATTEMPTS} attempts "
            f"(last: {refusal or last_error or 'no connection'}); servers: "
            f"{self._describe_servers()}"))

    def _connection(self) -> _Connection:
        with self._lock:
            if self._closed:
                raise ConnectionFailed("the client is closed")
            self._connections = [c for c in self._connections if c.usable]
            if len(self._connections) < self._target:
                errors, tls_refused = self._open_connection()
                if errors and not self._connections:
                    raise ConnectionFailed(_no_connection(errors, tls_refused))
            return self._connections[next(self._connection_turn) % len(self._connections)]

    def _open_connection(self) -> tuple[list[str], bool]:
        """Connect to the next server that is not marked down.

        Returns the errors met, and whether each was a server certificate this
        client could not verify (the server runs; the certificates do not match).
        """
        now = time.monotonic()
        turn = next(self._server_turn)
        candidates = [self.servers[(turn + i) % len(self.servers)]
                      for i in range(len(self.servers))]
        up = [address for address in candidates if self._down_until.get(address, 0) <= now]
        errors = []
        tls_refused = True
        for address in up or candidates:
            try:
                self._connections.append(_Connection(address, self.connect_timeout,
                                                     self._take_back, self._auth_token,
                                                     self._ssl_context))
                return [], False
            except OSError as exc:
                self._down_until[address] = now + DOWN_RETRY_DELAY
                tls_refused = tls_refused and isinstance(exc, ssl.SSLCertVerificationError)
                errors.append(f"{address[0]}:{address[1]}: {exc.strerror or exc}")
        return errors, tls_refused

    def _describe_servers(self) -> str:
        return ", ".join(f"{host}:{port}" for host, port in self.servers)


def _no_connection(errors: list[str], tls_refused: bool) -> str:
    """Why no connection could be made, and what to do about it."""
    if tls_refused:
        # The server answered: it runs, but its certificate was not accepted.
        return (f"the task server answered but its TLS certificate was not accepted "
                f"({'; '.join(errors)}): "
                "give the CA certificates that signed the server's certificate (greentask "
                "call --ca-certs FILE, [gateway] ca_certs, or greentask.tls.client_context("
                "ca_certs=FILE)) and connect by a name or IP address that the certificate "
                "names")
    return (f"cannot connect to any task server ({'; '.join(errors)}); is greentask running "
            "there? (start it with scripts/run)")


def _parse_server(server: str) -> tuple[str, int]:
    try:
        return parse_address(server)
    except ValueError as exc:
        raise ValueError(f"bad server {server!r}: {exc}") from None


__all__ = ["TaskClient", "TaskHandle"]
