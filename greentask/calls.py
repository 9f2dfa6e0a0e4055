"""The client's sans-IO core, shared by TaskClient (threads) and AsyncTaskClient (asyncio).

Theory of operation
-------------------
A :class:`Call` is one task a caller asked for, across every connection it
is sent on. :class:`CallConnection` is one connection's bookkeeping without
any I/O, as h11's ``Connection`` is for HTTP: it numbers requests, keeps the
ones waiting for a reply, matches reply lines to them and says when the
connection should be closed. A transport queues requests and cancels on it,
writes what :meth:`~CallConnection.take_output` returns (all the lines of one
turn of its event loop in one send, when it can wait that long), feeds it
the bytes it reads, and acts on the events it gives back: :class:`Progress`,
:class:`Answered` and :class:`GivenBack`. A request whose line was not
wholly written when the connection ended never reached a server: it is
given back as not sent, never as lost.

A request given back unanswered goes to :func:`resend_or_error`, the one
retry policy: one that did not run (refused, ``ShuttingDown``) is always sent
again, one whose connection died after it was sent only with ``retry=True``,
a cancelled one never. Which connection and which server a request goes
to is :mod:`greentask.servers`'s choice.

The core is not thread-safe: the threaded transport calls it under its
connection's lock; asyncio's single thread needs none.
"""

from __future__ import annotations

import enum
import itertools
import logging
import ssl
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

from greentask.errors import (
    Cancelled,
    ShuttingDown,
    TaskTimeout,
    Unauthorized,
    WorkerLost,
)
from greentask.protocol import LineDecoder, Reply, encode_cancel, encode_request, parse_reply
from greentask.tls import is_handshake_refusal

log = logging.getLogger("greentask.client")

#: Longest reply line the client accepts (64 MiB).
MAX_REPLY_LINE = 64 * 1024 * 1024
#: Seconds a call waits past its own timeout for the server's Timeout reply.
REPLY_MARGIN = 1.0
#: Times one request may be sent (failover, ShuttingDown, retry=True) before it fails.
MAX_ATTEMPTS = 5


class Unanswered(enum.Enum):
    """Why a connection gives a request back to its client without a reply."""

    #: The server refused the connection before reading anything (a TLS
    #: certificate check): the task did not run.
    REFUSED = "refused"
    #: The server answered ShuttingDown: the task did not run.
    SHUTTING_DOWN = "shutting down"
    #: The connection ended before the request was written: the task did not run.
    UNSENT = "not sent"
    #: The connection died after the request was sent: the task may have run.
    LOST = "lost"


ProgressCallback = Callable[[Any], None]


class Call:
    """One task a caller asked for: what to send, how often it was sent, how it ended.

    A transport's handle subclasses it and wakes its waiters in :meth:`_woken`.
    """

    def __init__(self, function: str, args: list[Any] | dict[str, Any], timeout: float,
                 retry: bool, on_progress: ProgressCallback | None = None,
                 wants_progress: bool = False) -> None:
        self.function = function
        self.args = args
        self.timeout = timeout
        self.retry = retry
        self.on_progress = on_progress
        self.wants_progress = wants_progress or on_progress is not None
        #: Times the client has sent it (failover, ShuttingDown, retry=True).
        self.attempts = 0
        self.cancelled = False
        #: Its id on the connection that has it, once sent.
        self.request_id: int | None = None
        #: The transport's connection that carries it (with a ``cancel(call)``).
        self.connection: Any = None
        #: Why a server last refused it (it did not run), for the final error.
        self.refusal = ""
        self._finished = False
        self._result: Any = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        """True once the result or the error is in."""
        return self._finished

    @property
    def reply_wait(self) -> float:
        """Default seconds to wait for the reply: a little past the timeout the
        server enforces, so its Timeout reply (which names the limit) comes first."""
        return self.timeout + REPLY_MARGIN

    def no_reply_in(self, wait: float) -> TaskTimeout:
        """The error of a caller that waited ``wait`` seconds for nothing."""
        return TaskTimeout(f"no reply to task {self.function!r} within {wait:g} s; the "
                           "server may still be running it")

    def _cancel_now(self) -> None:
        if self._finished:
            return
        self.cancelled = True
        if self.connection is not None:
            self.connection.cancel(self)

    def _outcome(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._result

    def _resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        if self._finished:
            return
        self._result, self._error, self._finished = result, error, True
        self._woken()

    def _woken(self) -> None:
        """The call is done, or has progress: wake whoever waits (a transport's hook)."""

    def _progress(self, value: Any) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(value)
            except Exception:
                log.exception("on_progress callback of task %r raised", self.function)


class Progress(NamedTuple):
    """A progress value the task reported."""

    call: Call
    value: Any


class Answered(NamedTuple):
    """The call is done: ``error`` is None for a result."""

    call: Call
    result: Any
    error: BaseException | None


class GivenBack(NamedTuple):
    """The connection cannot answer the call: :func:`resend_or_error` decides."""

    call: Call
    cause: Unanswered
    reason: str


Event = Progress | Answered | GivenBack


class Output(NamedTuple):
    """Bytes for the transport to write, and where each request's line in them ends."""

    data: bytes
    ends: list[tuple[Call, int]]


class NotSent(Exception):
    """The request was not written on this connection: no server has it."""


class CallConnection:
    """One connection's requests and replies, without I/O."""

    def __init__(self) -> None:
        self.alive = True
        #: The server said ``closing``, refused the token, or a write failed:
        #: send nothing more here.
        self.draining = False
        #: Why the connection ended (or cannot go on), once it has.
        self.closed_because = ""
        #: The server's Unauthorized, once it refused this connection's token.
        self.refusal: Unauthorized | None = None
        self.received = False
        self._decoder = LineDecoder(MAX_REPLY_LINE)
        self._pending: dict[int, Call] = {}
        self._ids = itertools.count(1)
        #: Lines queued and not yet taken by the transport, each with its request
        #: (None for a cancel): such a request never reached a server.
        self._output: list[tuple[bytes, Call | None]] = []

    @property
    def usable(self) -> bool:
        """True while new requests may be sent on it."""
        return self.alive and not self.draining

    @property
    def should_close(self) -> bool:
        """True when the transport should close: draining, with nothing left to answer,
        or a reply line too long to go on."""
        return self.alive and ((self.draining and not self._pending) or self._decoder.too_large)

    @property
    def pending(self) -> int:
        """Requests sent and not answered yet."""
        return len(self._pending)

    def queue(self, call: Call) -> bool:
        """Register ``call`` as sent and queue its line for :meth:`take_output`.

        Returns True when nothing was queued before it (the transport should
        arrange a write). Raises :class:`NotSent` when this connection takes
        no more requests, :class:`Unauthorized` when its server refused the token.
        """
        if self.refusal is not None:
            # The same token would be refused on any connection.
            raise Unauthorized(self.refusal.message)
        if not self.usable:
            raise NotSent(self.closed_because or "the server is closing this connection")
        request_id = next(self._ids)
        line = encode_request(call.function, call.args, request_id,
                              progress=call.wants_progress, timeout=call.timeout)
        call.request_id = request_id
        self._pending[request_id] = call
        self._output.append((line, call))
        return len(self._output) == 1

    def queue_cancel(self, call: Call) -> bool:
        """Queue the line that cancels ``call``, if this connection still has it;
        True when the transport should arrange a write."""
        if not self.alive or self._pending.get(call.request_id) is not call:  # type: ignore[arg-type]
            return False  # answered already, or lost with the connection
        self._output.append((encode_cancel(call.request_id), None))  # type: ignore[arg-type]
        return len(self._output) == 1

    def take_output(self) -> Output:
        """Everything queued, for the transport to write now, in one piece."""
        output, self._output = self._output, []
        ends: list[tuple[Call, int]] = []
        size = 0
        for line, call in output:
            size += len(line)
            if call is not None:
                ends.append((call, size))
        return Output(b"".join(line for line, _ in output), ends)

    def write_failed(self, output: Output, written: int) -> list[Call]:
        """The transport wrote only ``written`` bytes of ``output``: the requests whose
        lines were not wholly written never reached a server; they are returned, for
        the transport to give back (``Unanswered.UNSENT``)."""
        # Dead, though the reader may not have seen it yet: send no more here.
        self.draining = True
        unsent = [call for call, end in output.ends if end > written]
        for call in unsent:
            self._forget(call)
        return unsent

    def _forget(self, call: Call) -> None:
        if self._pending.get(call.request_id) is call:  # type: ignore[arg-type]
            del self._pending[call.request_id]  # type: ignore[arg-type]

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes the server sent; return what they mean for the calls."""
        self.received = True
        events: list[Event] = []
        for line in self._decoder.feed(data):
            self._receive_reply(parse_reply(line), events)
        if self._decoder.too_large:
            self.closed_because = f"a reply line was longer than {MAX_REPLY_LINE} bytes"
        return events

    def _receive_reply(self, reply: Reply, events: list[Event]) -> None:
        if reply.kind == "closing":
            # The server answers what it has read, then waits for us to close.
            self.draining = True
            return
        if reply.kind == "progress":
            call = self._pending.get(reply.id)  # type: ignore[arg-type]
        elif reply.id is not None:
            call = self._pending.pop(reply.id, None)  # type: ignore[arg-type]
        elif self._pending:
            # A plain Text protocol server echoes no id and answers in order.
            call = self._pending.pop(next(iter(self._pending)))
        else:
            call = None
        if reply.kind == "error" and isinstance(reply.value, Unauthorized):
            # The server runs nothing before a good token, and closes: every
            # request of this connection gets the same answer, even one sent
            # before this line arrived.
            self.refusal = reply.value
            self.draining = True
        if call is None:
            return
        if reply.kind == "progress":
            events.append(Progress(call, reply.value))
        elif reply.kind == "result":
            events.append(Answered(call, reply.value, None))
        elif isinstance(reply.value, ShuttingDown):
            # The task did not run: send nothing more here.
            self.draining = True
            events.append(GivenBack(call, Unanswered.SHUTTING_DOWN, str(reply.value)))
        else:
            events.append(Answered(call, None, reply.value))

    def connection_lost(self, reason: str, refused: bool = False) -> list[Event]:
        """The connection ended (``refused``: before the server read anything);
        every pending call is answered or given back."""
        self.alive = False
        self.closed_because = self.closed_because or reason
        output, self._output = self._output, []
        unsent = [call for _, call in output if call is not None]
        for call in unsent:
            self._forget(call)
        lost = list(self._pending.values())
        self._pending.clear()
        if self.refusal is not None:
            return [Answered(call, None, Unauthorized(self.refusal.message))
                    for call in lost + unsent]
        cause = Unanswered.REFUSED if refused else Unanswered.LOST
        return [GivenBack(call, cause, self.closed_because) for call in lost] + \
            [GivenBack(call, Unanswered.UNSENT, self.closed_because) for call in unsent]

    def read_failed(self, exc: OSError) -> list[Event]:
        """The transport's read raised ``exc``: say why the connection ended."""
        if isinstance(exc, ssl.SSLError):
            # Under TLS 1.3 the server checks the client's certificate after
            # the client's side of the handshake is done: its refusal arrives
            # as an alert here, and it read none of our requests.
            refused = not self.received and is_handshake_refusal(exc)
            return self.connection_lost(f"TLS: {exc.reason or exc}" + (
                " (the server requires a client certificate it accepts: [gateway] certfile "
                "and keyfile for the gateway and greentask call, or certfile and keyfile "
                "for greentask.tls.client_context)" if refused else ""), refused)
        return self.connection_lost(str(exc))


def resend_or_error(call: Call, cause: Unanswered, reason: str) -> BaseException | None:
    """The one retry policy: None to send ``call`` again, or the error it ends with."""
    if call.cancelled:
        return Cancelled(f"task {call.function!r} was cancelled; it was not sent again "
                         f"({reason})")
    if cause is Unanswered.LOST and not call.retry:
        return WorkerLost(
            f"connection to the task server closed before task {call.function!r} "
            f"answered ({reason}); it may or may not have run. Pass retry=True for tasks "
            "that are safe to run twice")
    if cause is not Unanswered.LOST:
        # A server's own "no" names the cause best if every attempt after it
        # fails too (a send on a connection that server already closed).
        call.refusal = reason
    return None


def make_call(call_type: type[C], function: str, args: list[Any] | dict[str, Any] | None,
              timeout: float, retry: bool, on_progress: ProgressCallback | None,
              wants_progress: bool = False) -> C:
    """A checked new call of ``call_type`` (a transport's handle)."""
    if args is not None and not isinstance(args, (list, dict)):
        raise TypeError(f"args must be a list or a dict, not {type(args).__name__}")
    return call_type(function, args or [], timeout, retry, on_progress, wants_progress)


#: What a connection calls with a request it gives back unanswered.
GiveBack = Callable[[Call, Unanswered, str], None]


def deliver(events: list[Event], give_back: GiveBack) -> None:
    """Act on a connection's events: progress and answers to their calls,
    unanswered requests to the client's ``give_back``."""
    for event in events:
        if isinstance(event, Progress):
            event.call._progress(event.value)
        elif isinstance(event, Answered):
            event.call._resolve(event.result, event.error)
        else:
            give_back(event.call, event.cause, event.reason)


def task_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any] | dict[str, Any]:
    """A task's arguments from a caller's ``*args`` or ``**kwargs`` (not both)."""
    if args and kwargs:
        raise TypeError("pass the task's arguments by position or by keyword, not both")
    return kwargs or list(args)


C = TypeVar("C", bound=Call)
