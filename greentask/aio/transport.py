"""One persistent connection of the asyncio client: the sans-IO core fed by a Protocol."""

from __future__ import annotations

import asyncio
import ssl

from greentask.calls import Call, CallConnection, GiveBack, deliver
from greentask.protocol import encode_hello


class Connection(asyncio.Protocol):
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
                   auth_token: str | None, ssl_context: ssl.SSLContext | None) -> Connection:
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

    def send(self, handle: Call) -> None:
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

    def cancel(self, handle: Call) -> None:
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
