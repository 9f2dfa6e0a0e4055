"""AsyncTaskClient: call tasks from asyncio (FastAPI, Starlette, aiohttp) without gevent.

Theory of operation
-------------------
The same client as :class:`greentask.TaskClient`, on asyncio's transports
instead of sockets and threads: up to ``connections_per_server`` persistent
connections to each server, opened on first use and shared by every
coroutine; requests pipelined on them with ids; failover, ``retry=True``,
the ``closing`` notice and ``ShuttingDown`` handled alike, because both
clients are transports of one sans-IO core, :mod:`greentask.calls`.

Each connection is an :class:`asyncio.Protocol`: ``data_received`` feeds
the core and resolves handles at once, with no reader task and no lock (the
loop's one thread serialises everything). A write goes to the transport's
buffer; a caller waits only while the buffer is above its high-water mark.
A request whose connection dies after it was buffered may have reached the
server, so it counts as sent: it raises :class:`WorkerLost` unless
``retry=True``, as with the threaded client.

Cancelling the coroutine that awaits a task (``task.cancel()``,
``asyncio.timeout()``) cancels the task on the server too.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import AsyncIterator, Iterable
from typing import Any

from greentask.calls import (
    MAX_ATTEMPTS,
    Call,
    CallConnection,
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
from greentask.servers import ServerPool

#: Seconds :meth:`AsyncTaskClient.close` waits for a connection to flush and close.
CLOSE_WAIT = 1.0

class AsyncTaskHandle(Call):
    """A submitted task: ``await handle`` (or :meth:`result`) gives its result."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        #: Futures of the coroutines awaiting its end, and of those awaiting progress.
        self._waiters: list[asyncio.Future[None]] = []
        self._progress_waiters: list[asyncio.Future[None]] = []
        self._progress_values: collections.deque[Any] | None = (
            collections.deque() if self.wants_progress else None)

    def __await__(self) -> Any:
        return self.result().__await__()

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the result and return it, or raise the task's error.

        The errors are :class:`greentask.TaskClient`'s: :class:`RemoteError`
        and its subclasses, :class:`TaskTimeout` when nothing came within
        ``timeout`` (default: the call's timeout plus
        :data:`~greentask.calls.REPLY_MARGIN`), :class:`WorkerLost`,
        :class:`ConnectionFailed`. If the awaiting coroutine is cancelled, the
        task is cancelled on the server too.
        """
        if not self._finished:
            wait = self.reply_wait if timeout is None else timeout
            # A bare future and a timer: the cheapest wait asyncio has, paid per call.
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            self._waiters.append(waiter)
            timer = loop.call_later(wait, _wake, waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                self._cancel_now()
                raise
            finally:
                timer.cancel()
                if waiter in self._waiters:  # timed out, or the awaiting task was cancelled
                    self._waiters.remove(waiter)
            if not self._finished:
                raise self.no_reply_in(wait)
        return self._outcome()

    async def progress(self) -> AsyncIterator[Any]:
        """Yield each progress value the task reports, until it is done.

        The task must have been submitted with ``progress=True`` (or an
        ``on_progress``); values that came before the iteration began are
        yielded first.
        """
        if self._progress_values is None:
            raise RuntimeError(f"task {self.function!r} was submitted without progress: pass "
                               "progress=True (or on_progress=...) to submit()")
        loop = asyncio.get_running_loop()
        while True:
            while self._progress_values:
                yield self._progress_values.popleft()
            if self._finished:
                return
            waiter = loop.create_future()
            self._progress_waiters.append(waiter)
            await waiter

    async def cancel(self) -> None:
        """Ask the server to cancel the task, and return at once.

        Awaiting the handle then raises :class:`Cancelled` (with ``.result``
        when the task reported what it had done), unless the task finished
        first. Does nothing once the task is done.
        """
        self._cancel_now()

    def _progress(self, value: Any) -> None:
        if self._progress_values is not None:
            self._progress_values.append(value)
            self._wake_progress_waiters()
        super()._progress(value)

    def _woken(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            _wake(waiter)
        self._wake_progress_waiters()

    def _wake_progress_waiters(self) -> None:
        waiters, self._progress_waiters = self._progress_waiters, []
        for waiter in waiters:
            _wake(waiter)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One persistent connection: the core fed from ``data_received``."""

    def __init__(self, address: tuple[str, int], give_back: GiveBack) -> None:
        self.address = address
        self.calls = CallConnection()
        self.closed = asyncio.Event()
        self._give_back = give_back
        self._transport: asyncio.Transport | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    @classmethod
    async def open(cls, address: tuple[str, int], connect_timeout: float, give_back: GiveBack,
                   auth_token: str | None, ssl_context: ssl.SSLContext | None) -> _Connection:
        """Connect (and shake hands, for TLS) within ``connect_timeout`` seconds."""
        loop = asyncio.get_running_loop()
        host, port = address
        async with asyncio.timeout(connect_timeout):
            _, connection = await loop.create_connection(
                lambda: cls(address, give_back), host, port, ssl=ssl_context,
                server_hostname=host if ssl_context is not None else None)
        if auth_token is not None and connection._transport is not None:
            # No reply on success: requests may follow at once.
            connection._transport.write(encode_hello(auth_token))
        return connection

    @property
    def usable(self) -> bool:
        """True while new requests may be sent on it."""
        return self.calls.usable

    def send(self, handle: AsyncTaskHandle) -> None:
        """Write ``handle``'s request; raises :class:`NotSent` when it was not."""
        self._queued(self.calls.queue(handle))
        handle.connection = self
        if handle.cancelled:  # cancelled while it waited for a connection
            self.cancel(handle)

    @property
    def writable(self) -> bool:
        """False while the transport's buffer is above its high-water mark."""
        return self._writable.is_set()

    async def drained(self) -> None:
        """Return once the transport's buffer is below its high-water mark."""
        await self._writable.wait()

    def cancel(self, handle: AsyncTaskHandle) -> None:
        """Send the cancel line of ``handle``, if this connection still has it."""
        self._queued(self.calls.queue_cancel(handle))

    def close(self, reason: str) -> None:
        """Close after the buffered writes; whatever is still pending is given back."""
        self.calls.closed_because = self.calls.closed_because or reason
        if self._transport is not None:
            self._flush()
            self._transport.close()

    def abort(self) -> None:
        """Close at once, dropping buffered writes."""
        if self._transport is not None:
            self._transport.abort()

    def _queued(self, first: bool) -> None:
        # One send per turn of the loop, not one per line: with many callers
        # the system calls, not the bookkeeping, were most of a call's cost.
        if first:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        # A closing transport writes nothing: what is queued stays with the
        # core, which gives it back as not sent when the connection is lost.
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(self.calls.take_output().data)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        events = self.calls.receive_data(data)
        if self.calls.should_close:
            self.close("closed by the client once every request was answered")
        deliver(events, self._give_back)

    def eof_received(self) -> bool:
        return False  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if isinstance(exc, OSError):
            events = self.calls.read_failed(exc)
        else:
            events = self.calls.connection_lost("closed by the server")
        self._writable.set()
        self.closed.set()
        deliver(events, self._give_back)

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()


class AsyncTaskClient:
    """Calls tasks on greentask servers from asyncio; share one per event loop.

    The arguments are :class:`greentask.TaskClient`'s: ``servers``
    (``"HOST:PORT"`` strings, round-robin with failover), ``timeout`` (the
    default seconds a call waits; also sent to the server, which stops the
    task after it), ``connect_timeout``, ``connections_per_server``,
    ``auth_token`` and ``ssl_context`` (see
    :func:`greentask.tls.client_context`). Use it as ``async with
    AsyncTaskClient([...]) as client:``, or call :meth:`close`.
    """

    def __init__(self, servers: Iterable[str] = ("127.0.0.1:12345",), timeout: float = 30.0,
                 connect_timeout: float = 5.0, connections_per_server: int = 2,
                 auth_token: str | None = None,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self._pool: ServerPool[_Connection] = ServerPool(servers, connections_per_server)
        self.servers = self._pool.servers
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._auth_token = auth_token
        self._ssl_context = ssl_context
        self._opening: asyncio.Lock | None = None
        #: The event loop that first used it: its connections live there.
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Sends again of given-back requests, kept so they are not collected.
        self._resends: set[asyncio.Task[None]] = set()

    async def call(self, function: str, /, *args: Any, retry: bool = False,
                   timeout: float | None = None, on_progress: ProgressCallback | None = None,
                   **kwargs: Any) -> Any:
        """Run ``function`` on a server and return its result, or raise its error.

        Positional or keyword arguments (not both) are the task's; ``retry``,
        ``timeout`` and ``on_progress`` are the call's own (see :meth:`submit`).
        """
        handle = await self.apply(function, task_arguments(args, kwargs), retry=retry,
                                  timeout=timeout, on_progress=on_progress)
        try:
            return await handle.result()
        except TaskTimeout:
            # No reply in time: do not leave it running on the server.
            handle._cancel_now()
            raise

    async def submit(self, function: str, /, *args: Any, retry: bool = False,
                     timeout: float | None = None, on_progress: ProgressCallback | None = None,
                     progress: bool = False, **kwargs: Any) -> AsyncTaskHandle:
        """Send a task and return its handle once it is written.

        ``retry=True`` says the task is safe to run twice: if its connection
        dies before the reply, it is sent again to another server.
        ``progress=True`` asks for the task's progress, to iterate with
        ``async for value in handle.progress()``; ``on_progress(value)`` is
        called for each value, from the event loop: keep it short.
        """
        return await self.apply(function, task_arguments(args, kwargs), retry=retry,
                                timeout=timeout, on_progress=on_progress, progress=progress)

    async def apply(self, function: str, args: list[Any] | dict[str, Any] | None = None, *,
                    retry: bool = False, timeout: float | None = None,
                    on_progress: ProgressCallback | None = None,
                    progress: bool = False) -> AsyncTaskHandle:
        """Like :meth:`submit`, with the task's arguments as one list or dict."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None and not self._loop.is_closed():
                raise RuntimeError("this AsyncTaskClient belongs to the event loop that first "
                                   "used it; make one client per event loop")
            self._loop = loop
            self._pool.connections = []  # any left from a closed loop are dead
        handle = make_call(AsyncTaskHandle, function, args,
                           self.timeout if timeout is None else timeout, retry, on_progress,
                           progress)
        try:
            await self._send(handle)
        except asyncio.CancelledError:
            handle._cancel_now()
            raise
        return handle

    async def close(self) -> None:
        """Close every connection; calls still waiting raise :class:`WorkerLost`."""
        connections = self._pool.close()
        for connection in connections:
            connection.close("the client was closed")
        for connection in connections:
            try:
                async with asyncio.timeout(CLOSE_WAIT):
                    await connection.closed.wait()
            except TimeoutError:
                connection.abort()  # the server does not read: drop what is buffered

    async def __aenter__(self) -> AsyncTaskClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _take_back(self, handle: Call, cause: Unanswered, reason: str) -> None:
        """A request a connection gave back unanswered: send it again, or fail it."""
        error = resend_or_error(handle, cause, reason)
        if error is not None:
            handle._resolve(error=error)
            return
        resend = asyncio.get_running_loop().create_task(
            self._send(handle))  # type: ignore[arg-type]
        self._resends.add(resend)
        resend.add_done_callback(self._resends.discard)

    async def _send(self, handle: AsyncTaskHandle) -> None:
        """Send ``handle`` on some connection, up to MAX_ATTEMPTS times in all."""
        last_error = ""
        while handle.attempts < MAX_ATTEMPTS:
            handle.attempts += 1
            try:
                connection = self._pool.pick() or await self._connection()
                connection.send(handle)
                if not connection.writable:
                    # The peer reads slower than callers write: wait as a socket would.
                    await connection.drained()
                return
            except NotSent as exc:
                last_error = str(exc)
            except GreentaskError as exc:
                handle._resolve(error=exc)
                return
        handle._resolve(error=self._pool.undeliverable(handle, last_error))

    async def _connection(self) -> _Connection:
        """A connection to open, since the pool had none to pick (see :meth:`_send`)."""
        if self._opening is None:
            self._opening = asyncio.Lock()
        if self._opening.locked():
            # Another coroutine is opening one: use an open one meanwhile.
            connection = self._pool.any()
            if connection is not None:
                return connection
        async with self._opening:
            connection = self._pool.pick()
            if connection is not None:
                return connection
            opening = self._pool.opening()
            for address in opening.addresses:
                try:
                    return opening.opened(await _Connection.open(
                        address, self.connect_timeout, self._take_back, self._auth_token,
                        self._ssl_context))
                except OSError as exc:
                    opening.failed(address, exc)
            return opening.fallback()


__all__ = ["AsyncTaskClient", "AsyncTaskHandle"]
