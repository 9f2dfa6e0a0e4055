"""Exceptions, and the wire form of the ones a task server sends back.

Errors have a direction. ``RemoteError`` and its subclasses are what a task
server answers with (``{"ok": false, "error": {"type": ..., "message": ...}}``):
the server raises them while handling a request and the client raises the same
class again from the reply, so ``except UnknownFunction`` works on both sides.
``ConnectionFailed`` and ``WorkerLost`` happen on the client's side of the
wire; ``ConfigError`` is the user's config file or flags.
"""

from __future__ import annotations

from typing import Any


class GreentaskError(Exception):
    """Base class of every error greentask raises."""


class RemoteError(GreentaskError):
    """An error a task server answered with; ``.type`` is its wire name."""

    #: The ``type`` of this class on the wire.
    wire_type = "Error"
    #: The id of the request that failed, when the server could read one.
    request_id: int | str | None = None

    def __init__(self, message: str, type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.type = type or self.wire_type

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """Return the ``error`` object of a reply line."""
        return {"type": self.type, "message": self.message}

    @classmethod
    def from_dict(cls, error: Any) -> RemoteError:
        """Rebuild the exception a server sent; an unknown type stays a ``RemoteError``."""
        if not isinstance(error, dict):
            return RemoteError(f"malformed error object: {error!r}", "BadReply")
        type_name = str(error.get("type", "Error"))
        message = str(error.get("message", ""))
        error_class = WIRE_TYPES.get(type_name, RemoteError)
        if error_class is Cancelled:
            return Cancelled(message, type_name, result=error.get("result"))
        return error_class(message, type_name)


class BadRequest(RemoteError):
    """The line is not JSON, not an object, or a field has the wrong type."""

    wire_type = "BadRequest"


class UnknownFunction(RemoteError):
    """No task is registered under the requested name."""

    wire_type = "UnknownFunction"


class BadArguments(RemoteError):
    """The arguments do not fit the task's signature."""

    wire_type = "BadArguments"


class TaskError(RemoteError):
    """The task raised; the message names the exception's class."""

    wire_type = "TaskError"


class TaskTimeout(RemoteError):
    """The task ran past its timeout (on the server, or while the client waited)."""

    wire_type = "Timeout"


class TooLarge(RemoteError):
    """A request line was longer than the server's ``max_line``."""

    wire_type = "TooLarge"


class Unauthorized(RemoteError):
    """The connection did not present the shared token; the server closes it."""

    wire_type = "Unauthorized"


class ShuttingDown(RemoteError):
    """The server process is stopping; the task was not run and may be sent elsewhere."""

    wire_type = "ShuttingDown"


class Cancelled(RemoteError):
    """The task was cancelled by its caller before it finished.

    Raised inside the task at its next cooperative point (any gevent switch).
    A task may catch it to clean up, then end; it may report what it had done
    with ``raise Cancelled(result={"sent": 412, "total": 1000})``, which
    travels as ``error.result``. Never retried, and never counted as a failure.
    """

    wire_type = "Cancelled"

    def __init__(self, message: str = "the task was cancelled", type: str | None = None, *,
                 result: Any = None) -> None:
        super().__init__(message, type)
        #: What the task had done when it was cancelled, if it said (any JSON), or None.
        self.result = result

    def to_dict(self) -> dict[str, Any]:
        """The ``error`` object, with ``result`` when the task gave one."""
        error = super().to_dict()
        if self.result is not None:
            error["result"] = self.result
        return error


#: Wire ``type`` -> exception class, for rebuilding errors from replies.
WIRE_TYPES: dict[str, type[RemoteError]] = {
    cls.wire_type: cls
    for cls in (BadRequest, UnknownFunction, BadArguments, TaskError, TaskTimeout, TooLarge,
                Unauthorized, ShuttingDown, Cancelled)
}


class ConnectionFailed(GreentaskError):
    """No task server in the client's list accepted a connection."""


class WorkerLost(GreentaskError):
    """The connection closed after the request was sent and before its reply came."""


class ConfigError(GreentaskError):
    """A config file, environment variable or flag is wrong; the message says where."""
