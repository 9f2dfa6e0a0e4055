"""AsyncTaskClient: call tasks from asyncio (FastAPI, Starlette, aiohttp) without gevent.

Theory of operation
-------------------
The same client as :class:`greentask.TaskClient`, on asyncio's transports
instead of sockets and threads: up to ``connections_per_server`` persistent
connections to each server, opened on first use and shared by every
coroutine; requests pipelined on them with ids; failover, ``retry=True``,
the ``closing`` notice and ``ShuttingDown`` handled alike, because both
clients are transports of one sans-IO core, :mod:`greentask.calls`.

Its parts: :mod:`greentask.aio.handle` (what a caller awaits) and
:mod:`greentask.aio.transport` (one connection). Each connection is an
:class:`asyncio.Protocol`: ``data_received`` feeds the core and resolves
handles at once, with no reader task and no lock (the loop's one thread
serialises everything). A write goes to the transport's buffer; a caller
waits only while the buffer is above its high-water mark. A request whose
connection dies after it was buffered may have reached the server, so it
counts as sent: it raises :class:`WorkerLost` unless ``retry=True``, as with
the threaded client.

Cancelling the coroutine that awaits a task (``task.cancel()``,
``asyncio.timeout()``) cancels the task on the server too.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterable
from typing import Any

from greentask.aio.handle import AsyncTaskHandle
from greentask.aio.transport import Connection
from greentask.calls import (
    MAX_ATTEMPTS,
    Call,
    NotSent,
    ProgressCallback,
    Unanswered,
    make_call,
    resend_or_error,
    task_arguments,
)
from greentask.errors import GreentaskError, TaskTimeout
from greentask.servers import ServerPool

#: Seconds :meth:`AsyncTaskClient.close` waits for a connection to flush and close.
CLOSE_WAIT = 1.0


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
        self._pool: ServerPool[Connection] = ServerPool(servers, connections_per_server)
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

    async def _connection(self) -> Connection:
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
                    return opening.opened(await Connection.open(
                        address, self.connect_timeout, self._take_back, self._auth_token,
                        self._ssl_context))
                except OSError as exc:
                    opening.failed(address, exc)
            return opening.fallback()


__all__ = ["AsyncTaskClient", "AsyncTaskHandle"]
