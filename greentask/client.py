"""TaskClient: call tasks on greentask servers over persistent, pipelined connections.

Theory of operation
-------------------
The client keeps up to ``connections_per_server`` connections to each server
in its list, opened on first use. Each request gets an id unique on its
connection and is written at once, or, when the client was given ``spawn``
(``gevent.spawn``), by a greenlet that runs once the callers of this turn of
the event loop have queued theirs, so their lines go out in one send. A
reader thread per connection matches reply lines to waiting
:class:`TaskHandle` objects by id, so any number of callers share one
connection. The client uses only ``socket`` and
``threading``: in a gevent-monkey-patched process those are gevent's, so it
works from greenlets as well as from plain threads.

The bookkeeping (ids, pending requests, reply matching, the ``closing``
notice, the retry policy, the choice of server) is the sans-IO core in
:mod:`greentask.calls`, shared with :class:`greentask.aio.AsyncTaskClient`;
this module is its transport on sockets and threads.

Failures: a server that refuses connections is skipped for
:data:`~greentask.servers.DOWN_RETRY_DELAY` seconds and the next one is tried. A request that
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

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from typing import Any

from greentask.calls import (
    MAX_ATTEMPTS,
    Call,
    CallConnection,
    Event,
    GiveBack,
    NotSent,
    ProgressCallback,
    Unanswered,
    deliver,
    make_call,
    resend_or_error,
    task_arguments,
)
from greentask.errors import GreentaskError, TaskTimeout
from greentask.protocol import encode_hello
from greentask.reader_thread import start_reader
from greentask.servers import ServerPool
from greentask.tls import SharedTLSStream

log = logging.getLogger("greentask.client")

#: Seconds a failed send waits for the connection's reader to learn why (a TLS
#: alert, a reset), so the error names the cause rather than a broken pipe.
SEND_FAILURE_GRACE = 0.5
#: What runs a function soon in another greenlet (``gevent.spawn``).
Spawn = Callable[[Callable[[], None]], object]


#: Guards every handle's done-callbacks (held only to add or take them).
_CALLBACKS_LOCK = threading.Lock()


class TaskHandle(Call):
    """A submitted task (a future): :meth:`get` waits for its result."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._done = threading.Event()
        self._callbacks: list[Callable[[TaskHandle], None]] = []

    def add_done_callback(self, callback: Callable[[TaskHandle], None]) -> None:
        """Call ``callback(handle)`` once the result or the error is in (at once if it
        is). It runs where the call ended, usually a connection's reader: keep it
        short, and never wait in it. ``handle.get(0)`` then gives the outcome."""
        with _CALLBACKS_LOCK:
            if not self._finished:
                self._callbacks.append(callback)
                return
        self._run_callback(callback)

    def cancel(self) -> None:
        """Ask the server to cancel the task, and return at once.

        :meth:`get` then raises :class:`Cancelled` (with ``.result`` when the
        task reported what it had done), unless the task finished first.
        Does nothing once the task is done.
        """
        self._cancel_now()

    def get(self, timeout: float | None = None) -> Any:
        """Wait for the result and return it, or raise the task's error.

        Raises :class:`RemoteError` (or a subclass such as :class:`TaskError`)
        for an error reply, :class:`TaskTimeout` when nothing came within
        ``timeout`` (default: the call's timeout, plus
        :data:`~greentask.calls.REPLY_MARGIN`), :class:`WorkerLost` or
        :class:`ConnectionFailed`.
        """
        wait = self.reply_wait if timeout is None else timeout
        if not self._done.wait(wait):
            raise self.no_reply_in(wait)
        return self._outcome()

    def _woken(self) -> None:
        self._done.set()
        with _CALLBACKS_LOCK:
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            self._run_callback(callback)

    def _run_callback(self, callback: Callable[[TaskHandle], None]) -> None:
        try:
            callback(self)
        except Exception:
            log.exception("a done-callback of task %r raised", self.function)


class _Connection:
    """One persistent connection and the thread that reads its replies.

    Its :class:`~greentask.calls.CallConnection` does the bookkeeping, under
    the lock; a request it cannot answer goes back to the client through
    ``give_back``, which alone decides whether to send it again.
    """

    def __init__(self, address: tuple[str, int], connect_timeout: float, give_back: GiveBack,
                 auth_token: str | None = None, ssl_context: ssl.SSLContext | None = None,
                 spawn: Spawn | None = None) -> None:
        self.address = address
        self._give_back = give_back
        self._spawn = spawn
        self._write_error = ""
        self.sock = socket.create_connection(address, timeout=connect_timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ssl_context is None:
            self.sock.settimeout(None)
            self._recv, self._send = self.sock.recv, self.sock.send
        else:
            try:
                # The handshake runs within connect_timeout, still blocking.
                self.sock = ssl_context.wrap_socket(self.sock, server_hostname=address[0])
            except OSError:
                self.sock.close()
                raise
            stream = SharedTLSStream(self.sock)
            self._recv, self._send = stream.recv, stream.send
        if auth_token is not None:
            # No reply on success: requests may follow at once.
            hello = encode_hello(auth_token)
            if self._write(hello) < len(hello):
                self.sock.close()
                raise OSError(self._write_error)
        self.calls = CallConnection()
        self._lock = threading.Lock()
        self._reader_done = threading.Event()
        start_reader(self._read_loop, f"greentask-reader-{address[1]}")

    @property
    def usable(self) -> bool:
        """True while new requests may be sent on it."""
        return self.calls.usable

    def send(self, handle: TaskHandle) -> None:
        """Queue ``handle``'s request; raises :class:`NotSent` when this connection takes
        no more. A request that then cannot be written goes back to the client."""
        with self._lock:
            # Decided under the lock the close is decided under: a request is
            # either pending before the close, or never written here.
            first = self.calls.queue(handle)
            handle.connection = self
            if handle.cancelled:  # cancelled while it waited for a connection
                self.calls.queue_cancel(handle)
            unsent = self._queued(first)
        self._give_back_unsent(unsent)

    def cancel(self, handle: TaskHandle) -> None:
        """Send the cancel line of ``handle``, if this connection still has it."""
        with self._lock:
            unsent = self._queued(self.calls.queue_cancel(handle))
        self._give_back_unsent(unsent)

    def _queued(self, first: bool) -> list[Call]:
        # Under the lock. Lines queued after the first wait for its write.
        if not first:
            return []
        if self._spawn is not None:
            self._spawn(self._flush)
            return []
        return self._write_output()

    def _flush(self) -> None:
        with self._lock:
            unsent = self._write_output()
        self._give_back_unsent(unsent)

    def _write_output(self) -> list[Call]:
        """Write what is queued (under the lock); the requests it could not write."""
        output = self.calls.take_output()
        written = self._write(output.data)
        if written == len(output.data):
            return []
        # Before the lock is let go: the reader must not count them as lost.
        return self.calls.write_failed(output, written)

    def _write(self, data: bytes) -> int:
        """Write ``data``; how much of it was written (less: see ``_write_error``)."""
        view, written = memoryview(data), 0
        try:
            while written < len(data):
                written += self._send(view[written:])
        except OSError as exc:
            self._write_error = str(exc)
        return written

    def _give_back_unsent(self, unsent: list[Call]) -> None:
        if not unsent:
            return
        self._reader_done.wait(SEND_FAILURE_GRACE)
        reason = self.calls.closed_because or self._write_error
        for call in unsent:
            self._give_back(call, Unanswered.UNSENT, reason)

    def close(self) -> None:
        """Close; the reader fails whatever is still pending."""
        try:
            # The plain socket's shutdown: SSLSocket's would drop its TLS object
            # under the reader's feet.
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def _read_loop(self) -> None:
        events: list[Event] = []
        try:
            while True:
                data = self._recv(65536)
                with self._lock:
                    if not data:
                        events = self.calls.connection_lost("closed by the server")
                        break
                    events = self.calls.receive_data(data)
                    if self.calls.should_close:
                        self.close()
                deliver(events, self._give_back)
        except OSError as exc:
            with self._lock:
                events = self.calls.read_failed(exc)
        finally:
            self.sock.close()
            deliver(events, self._give_back)
            self._reader_done.set()


class TaskClient:
    """Calls tasks on one or more greentask servers; safe to share between greenlets and threads.

    ``servers``: ``"HOST:PORT"`` strings, tried in turn (round-robin, and on
    failure the next one). ``timeout``: default seconds a call waits for its
    result; also sent to the server, which stops the task after it.
    ``auth_token``: the servers' shared token, when they require one.
    ``ssl_context``: speak TLS (see :func:`greentask.tls.client_context`);
    the server's certificate is checked against the host name in ``servers``.
    ``spawn``: in a gevent program, ``gevent.spawn``: the requests made in one
    turn of the event loop are then written together, in one send per
    connection, by a greenlet it starts (many greenlets calling at once
    cost far fewer system calls).
    """

    def __init__(self, servers: Iterable[str] = ("127.0.0.1:12345",), timeout: float = 30.0,
                 connect_timeout: float = 5.0, connections_per_server: int = 2,
                 auth_token: str | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 spawn: Spawn | None = None) -> None:
        self._pool: ServerPool[_Connection] = ServerPool(servers, connections_per_server)
        self.servers = self._pool.servers
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._auth_token = auth_token
        self._ssl_context = ssl_context
        self._spawn = spawn
        self._lock = threading.Lock()

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
        return self.apply(function, task_arguments(args, kwargs), retry=retry, timeout=timeout,
                          on_progress=on_progress)

    def apply(self, function: str, args: list[Any] | dict[str, Any] | None = None, *,
              retry: bool = False, timeout: float | None = None,
              on_progress: ProgressCallback | None = None) -> TaskHandle:
        """Like :meth:`submit`, with the task's arguments as one list or dict.

        Use it when the arguments are data already, or when a task has an
        argument named ``retry``, ``timeout`` or ``on_progress``.
        """
        handle = make_call(TaskHandle, function, args, self.timeout if timeout is None else timeout,
                           retry, on_progress)
        self._send(handle)
        return handle

    def close(self) -> None:
        """Close every connection; calls still waiting raise :class:`WorkerLost`."""
        with self._lock:
            connections = self._pool.close()
        for connection in connections:
            connection.close()

    def __enter__(self) -> TaskClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _take_back(self, handle: Call, cause: Unanswered, reason: str) -> None:
        """A request a connection gave back unanswered: send it again, or fail it."""
        error = resend_or_error(handle, cause, reason)
        if error is None:
            self._send(handle)
        else:
            handle._resolve(error=error)

    def _send(self, handle: TaskHandle) -> None:
        """Send ``handle`` on some connection, up to MAX_ATTEMPTS times in all."""
        last_error = ""
        while handle.attempts < MAX_ATTEMPTS:
            handle.attempts += 1
            try:
                self._connection().send(handle)
                return
            except NotSent as exc:
                last_error = str(exc)
            except GreentaskError as exc:
                handle._resolve(error=exc)
                return
        handle._resolve(error=self._pool.undeliverable(handle, last_error))

    def _connection(self) -> _Connection:
        with self._lock:
            connection = self._pool.pick()
            if connection is not None:
                return connection
            opening = self._pool.opening()
            for address in opening.addresses:
                try:
                    return opening.opened(_Connection(address, self.connect_timeout,
                                                      self._take_back, self._auth_token,
                                                      self._ssl_context, self._spawn))
                except OSError as exc:
                    opening.failed(address, exc)
            return opening.fallback()


__all__ = ["TaskClient", "TaskHandle"]
