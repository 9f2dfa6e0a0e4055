"""The greentask wire protocol, sans-IO: bytes in, requests and replies out.

Theory of operation
-------------------
A connection carries UTF-8 JSON objects, one per line, each ending in ``\\n``
(``\\r\\n`` is accepted, empty lines are skipped). The caller sends requests::

    {"function": "send_mail", "args": {"to": "a@example.org"}, "id": 7, "progress": true}

and the server answers each with exactly one final line, ``{"id": 7, "ok": true,
"result": ...}`` or ``{"id": 7, "ok": false, "error": {"type": ..., "message":
...}}``, preceded by any number of ``{"id": 7, "progress": ...}`` lines when the
request asked for progress. ``docs/protocol.md`` is the full description.

Nothing here touches a socket. :class:`LineDecoder` turns received bytes into
complete lines and holds at most ``max_line`` bytes of an unfinished line, so a
peer that never sends a newline cannot grow memory. ``parse_request`` and
``parse_reply`` turn one line into a value or raise the documented error, and
the ``encode_*`` functions build the bytes to send.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import ujson

from greentask.errors import BadRequest, RemoteError, TooLarge

#: A request id: echoed on every line that answers the request.
RequestId = int | str | None

#: Default longest accepted line, its newline excluded (1 MiB).
DEFAULT_MAX_LINE = 1024 * 1024
#: Default deepest nesting of arrays and objects in a request, the request object included.
DEFAULT_MAX_DEPTH = 64
#: Default most reply bytes a server queues for a peer that does not read them.
DEFAULT_MAX_QUEUED = 16 * 1024 * 1024

#: Exact types of the common request's fields (ujson makes no subclasses).
_ARGS_TYPES = (list, dict, type(None))
_ID_TYPES = (int, str, type(None))
_COMMON_FIELDS = frozenset({"function", "args", "id"})
#: Every field a request may have.
_REQUEST_FIELDS = frozenset(("function", "args", "id", "progress", "timeout",
                             "cancel_on_disconnect"))


class LineDecoder:
    """Split a byte stream into lines, never buffering more than ``max_line`` bytes.

    ``feed(data)`` returns the complete, non-empty lines found so far, without
    their line ending. A line's length counts every byte before its ``\n``.
    When a line grows past ``max_line`` the decoder sets
    :attr:`too_large`, returns the lines that came before it and ignores all
    later input: the stream cannot be resynchronised, so the caller answers
    ``TooLarge`` and closes the connection.
    """

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError(f"max_line must be at least 1, not {max_line}")
        self.max_line = max_line
        self.too_large = False
        #: Bytes held of a line whose newline has not arrived yet (an attribute,
        #: not a property: the reader looks at it after every read).
        self.buffered = 0
        self._partial = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the complete lines they finish."""
        if self.too_large:
            return []
        if not self.buffered and data[-1:] == b"\n" and len(data) <= self.max_line and \
                13 not in data:
            # The common read: whole lines, so none is too long, none ends in \r
            # (13), and with no \r bytes' splitlines splits at \n only. Bytes
            # are tested by slice and by value: endswith and find parse their
            # arguments, and "in" with a bytes operand raises and clears a
            # TypeError first, each two to six times the cost.
            lines = data.splitlines()
            return lines if all(lines) else [line for line in lines if line]
        if data.find(b"\n") < 0:
            if len(self._partial) + len(data) > self.max_line:
                return self._overflow([])
            self._partial += data
            self.buffered = len(self._partial)
            return []
        chunks = data.split(b"\n")
        if self._partial:
            self._partial += chunks[0]
            chunks[0] = bytes(self._partial)
        tail = chunks.pop()
        lines = []
        for line in chunks:
            # The limit counts a trailing \r, so it does not depend on how the
            # bytes were split into reads.
            if len(line) > self.max_line:
                return self._overflow(lines)
            if line.endswith(b"\r"):
                line = line[:-1]
            if line:
                lines.append(line)
        if len(tail) > self.max_line:
            return self._overflow(lines)
        self._partial = bytearray(tail)
        self.buffered = len(tail)
        return lines

    def _overflow(self, lines: list[bytes]) -> list[bytes]:
        self.too_large = True
        self._partial = bytearray()
        self.buffered = 0
        return lines

    def too_large_error(self) -> TooLarge:
        """The error to answer with once :attr:`too_large` is set."""
        return TooLarge(
            f"request line is longer than max_line ({self.max_line} bytes); send smaller "
            "arguments (pass a reference such as a file name or URL instead of the data) "
            "or raise [worker] max_line; the connection is closed"
        )


class Request(NamedTuple):
    """One decoded request line (a tuple: one is made per request, and cheaply)."""

    function: str
    args: list[Any] | dict[str, Any]
    id: RequestId = None
    progress: bool = False
    timeout: float | None = None
    #: Cancel the task if its connection ends before the reply.
    cancel_on_disconnect: bool = False


#: Builds a Request from all its fields at C speed (NamedTuple's own
#: constructor is a Python function that fills in the defaults).
_new_request = tuple.__new__


class Cancel(NamedTuple):
    """A cancel line, ``{"cancel": ID}``: cancel the request with that id (same connection)."""

    id: int | str


def parse_request(line: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> Request | Cancel:
    """Decode one request line.

    Raises :class:`BadRequest` when the line is not a JSON object, nests
    arrays and objects more than ``max_depth`` levels deep, or a field has
    the wrong type. The error's ``request_id`` attribute holds the id when
    one could be read, so the reply can still be matched by the caller.
    """
    try:
        obj = ujson.loads(line)
    except ValueError as exc:  # JSONDecodeError, invalid UTF-8, deeper than ujson's 1024
        raise BadRequest(f"request is not valid JSON ({exc}); send one JSON object "
                         "per line, UTF-8 encoded") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"request must be a JSON object, not {_json_kind(obj)}; "
                         'send {"function": NAME, "args": ...}')
    request_id = obj.get("id")
    # Each level needs an opening and a closing bracket, so a line shorter
    # than twice the limit cannot be too deep, and counting brackets (in C)
    # clears almost every other line without walking the parsed value.
    if len(line) > 2 * max_depth + 1 and line.count(b"[") + line.count(b"{") > max_depth and \
            _deeper_than(obj, max_depth):
        too_deep = BadRequest(f"request nests arrays and objects more than {max_depth} "
                              "levels deep ([worker] max_json_depth); flatten the arguments")
        too_deep.request_id = _valid_id_or_none(request_id)
        raise too_deep
    # The common request ({"function", "args", "id"}, all well typed) in a few
    # type checks; anything else takes the path that explains what is wrong.
    function, args = obj.get("function"), obj.get("args")
    if type(function) is str and function and type(args) in _ARGS_TYPES and \
            type(request_id) in _ID_TYPES and obj.keys() <= _COMMON_FIELDS:
        return _new_request(Request, (function, [] if args is None else args, request_id,
                                      False, None, False))
    try:
        return _request_from_object(obj, request_id)
    except BadRequest as exc:
        exc.request_id = _valid_id_or_none(request_id)
        raise


def _deeper_than(value: Any, limit: int) -> bool:
    """True when ``value`` nests lists and dicts more than ``limit`` levels deep."""
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, (list, dict)))
    return False


def _request_from_object(obj: dict[str, Any], request_id: Any) -> Request | Cancel:
    if "cancel" in obj:
        return _cancel_from_object(obj)
    if request_id is not None and (not isinstance(request_id, (int, str))
                                   or isinstance(request_id, bool)):
        raise BadRequest(f'"id" must be a string or an integer, not {_json_kind(request_id)}')
    function = obj.get("function")
    if function is None or function == "":
        raise BadRequest('"function" is required: the name of a task, such as "echo"')
    if not isinstance(function, str):
        raise BadRequest(f'"function" must be a string, not {_json_kind(function)}')
    args = obj.get("args")
    if args is None:
        args = []
    elif not isinstance(args, (list, dict)):
        raise BadRequest('"args" must be an object (keyword arguments) or an array '
                         f"(positional arguments), not {_json_kind(args)}")
    progress = obj.get("progress", False)
    if not isinstance(progress, bool):
        raise BadRequest(f'"progress" must be true or false, not {_json_kind(progress)}')
    timeout = obj.get("timeout")
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not 0 < timeout < float("inf"):
            raise BadRequest(f'"timeout" must be a positive number of seconds, not {timeout!r}')
        timeout = float(timeout)
    cancel_on_disconnect = obj.get("cancel_on_disconnect", False)
    if not isinstance(cancel_on_disconnect, bool):
        raise BadRequest('"cancel_on_disconnect" must be true or false, not '
                         f"{_json_kind(cancel_on_disconnect)}")
    unknown = obj.keys() - _REQUEST_FIELDS
    if unknown:
        raise BadRequest(f"unknown request field(s) {sorted(unknown)}; the fields are "
                         f"{sorted(_REQUEST_FIELDS)}")
    return Request(function, args, request_id, progress, timeout, cancel_on_disconnect)


def _cancel_from_object(obj: dict[str, Any]) -> Cancel:
    request_id = obj["cancel"]
    if not isinstance(request_id, (int, str)) or isinstance(request_id, bool):
        raise BadRequest('"cancel" must be the id (a string or an integer) of a request sent '
                         f"on this connection, not {_json_kind(request_id)}")
    if obj.keys() != {"cancel"}:
        raise BadRequest(f'a cancel line has one field, "cancel"; not '
                         f"{sorted(obj.keys() - {'cancel'})}")
    return Cancel(request_id)


def _valid_id_or_none(request_id: Any) -> RequestId:
    if isinstance(request_id, (int, str)) and not isinstance(request_id, bool):
        return request_id
    return None


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "a number", float: "a number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def encode_line(value: dict[str, Any]) -> bytes:
    """``value`` as one JSON line; raises ``TypeError`` or ``OverflowError`` when it is not JSON.

    Every line greentask writes (task port and control socket) goes through here.
    """
    return (_json_text(value) + "\n").encode()


def _json_text(value: Any) -> str:
    # ujson writes NaN and Infinity by default, which JSON does not have; the
    # strict encoder raises for them, but its keyword costs more than the whole
    # encoding of a small reply: encode strictly only when the text has them.
    text = ujson.dumps(value)
    if "NaN" in text or "Infinity" in text:
        text = ujson.dumps(value, allow_nan=False)
    return text


def _line(reply: dict[str, Any], request_id: RequestId) -> bytes:
    if request_id is not None:
        reply["id"] = request_id
    return encode_line(reply)


def encode_result(request_id: RequestId, result: Any) -> bytes:
    """The final line of a task that returned ``result``.

    Raises ``TypeError`` or ``OverflowError`` when ``result`` is not JSON.
    """
    # The line of every task that succeeds: its envelope is written here around
    # ujson's text of the result (the same bytes as ujson.dumps of the whole
    # reply, in half its time: ujson's cost is mostly per call and per key).
    text = _json_text(result)
    if request_id is None:
        return f'{{"ok":true,"result":{text}}}\n'.encode()
    if type(request_id) is not int:
        request_id = ujson.dumps(request_id)
    return f'{{"ok":true,"result":{text},"id":{request_id}}}\n'.encode()


def encode_error(request_id: RequestId, error: RemoteError) -> bytes:
    """The final line of a request that failed with ``error``."""
    return _line({"ok": False, "error": error.to_dict()}, request_id)


def encode_progress(request_id: RequestId, value: Any) -> bytes:
    """A progress line; raises ``TypeError`` or ``OverflowError`` when ``value`` is not JSON."""
    return _line({"progress": value}, request_id)


def encode_hello(token: str) -> bytes:
    """The first line of a connection to a server that requires a token."""
    return encode_line({"auth": token})


def parse_hello(line: bytes) -> str | None:
    """The token of a hello line, or None when the line is not a hello."""
    try:
        obj = ujson.loads(line)
    except ValueError:
        return None
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(obj.get("auth"), str):
        return obj["auth"]
    return None


def encode_closing() -> bytes:
    """The notice a stopping server sends a pipelining peer: finish, then close."""
    return b'{"closing":true}\n'


def encode_cancel(request_id: int | str) -> bytes:
    """The line that cancels the request ``request_id`` sent on the same connection."""
    return encode_line({"cancel": request_id})


def encode_request(function: str, args: list[Any] | dict[str, Any] | None = None,
                   request_id: RequestId = None, progress: bool = False,
                   timeout: float | None = None) -> bytes:
    """The line that asks a server to run ``function``."""
    request: dict[str, Any] = {"function": function}
    if args:
        request["args"] = args
    if progress:
        request["progress"] = True
    if timeout is not None:
        request["timeout"] = timeout
    return _line(request, request_id)


class Reply(NamedTuple):
    """One decoded reply line.

    ``kind`` is ``"result"``, ``"error"``, ``"progress"``, or ``"closing"``
    (the server is stopping: send nothing more on this connection).
    """

    kind: str
    id: RequestId
    value: Any


def parse_reply(line: bytes) -> Reply:
    """Decode one line a task server sent.

    A line that is JSON but has neither ``ok`` nor ``progress`` (a plain Text
    protocol server, such as Workerman's task worker, answers with just the
    result) is a result, and so is a line that is not JSON at all: its text.
    """
    try:
        obj = ujson.loads(line)
    except ValueError:
        return Reply("result", None, line.decode("utf-8", "replace"))
    if not isinstance(obj, dict) or ("ok" not in obj and "progress" not in obj):
        if isinstance(obj, dict) and obj.get("closing") is True and len(obj) == 1:
            return Reply("closing", None, None)
        return Reply("result", None, obj)
    request_id = _valid_id_or_none(obj.get("id"))
    if "ok" not in obj:
        return Reply("progress", request_id, obj["progress"])
    if obj["ok"] is True:
        return Reply("result", request_id, obj.get("result"))
    return Reply("error", request_id, RemoteError.from_dict(obj.get("error")))
