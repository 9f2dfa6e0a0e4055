"""Task registration: ``@task`` maps a name to a function; ``progress`` reports from inside one.

Task modules are imported by the master before it forks (or by each worker,
with ``[worker] preload_tasks = no``), so their ``@task`` decorators fill the
:data:`default_registry` every worker inherits. The server looks a request's
``function`` up there and calls it with the request's ``args``.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, overload

from greentask.errors import BadArguments, UnknownFunction

F = TypeVar("F", bound=Callable[..., Any])

#: Where ``progress()`` sends values in the running task (per greenlet: each
#: greenlet has its own context).
_progress_sink: contextvars.ContextVar[Callable[[Any], None] | None] = \
    contextvars.ContextVar("greentask_progress_sink", default=None)


class Registry:
    """Task name -> function."""

    def __init__(self) -> None:
        # Changed in place only, so that ``get`` stays bound to it.
        self._tasks: dict[str, Callable[..., Any]] = {}
        #: The task called ``name``, or None: :meth:`lookup` at C speed, for
        #: the server's per-request path (which answers None with :meth:`unknown`).
        self.get: Callable[[str], Callable[..., Any] | None] = self._tasks.get

    def add(self, function: Callable[..., Any], name: str | None = None) -> str:
        """Register ``function`` under ``name`` (default: its ``__name__``); return the name."""
        name = name or function.__name__
        registered = self._tasks.get(name)
        if registered is not None and registered is not function:
            raise ValueError(f"task name {name!r} is already used by "
                             f"{registered.__module__}.{registered.__qualname__}")
        self._tasks[name] = function
        return name

    def names(self) -> list[str]:
        """The registered task names, sorted."""
        return sorted(self._tasks)

    def lookup(self, name: str) -> Callable[..., Any]:
        """Return the task called ``name`` or raise :class:`UnknownFunction`."""
        try:
            return self._tasks[name]
        except KeyError:
            raise self.unknown(name) from None

    def unknown(self, name: str) -> UnknownFunction:
        """The error for a request of ``name``, which no task has."""
        return UnknownFunction(f"no task named {name!r}; this server has {self.names()} "
                               "(add its module to [worker] tasks)")

    def remove_tasks_of(self, modules: Collection[str]) -> None:
        """Forget the tasks whose functions are defined in ``modules``."""
        for name in [name for name, fn in self._tasks.items() if fn.__module__ in modules]:
            del self._tasks[name]

    def snapshot(self) -> dict[str, Callable[..., Any]]:
        """A copy of the name -> function table, for :meth:`restore`."""
        return dict(self._tasks)

    def restore(self, snapshot: dict[str, Callable[..., Any]]) -> None:
        """Go back to the tasks of a :meth:`snapshot`."""
        self._tasks.clear()
        self._tasks.update(snapshot)


#: The registry that ``@task`` fills and the server serves.
default_registry = Registry()


@overload
def task(function: F, *, name: str | None = None) -> F: ...
@overload
def task(function: None = None, *, name: str | None = None) -> Callable[[F], F]: ...


def task(function: Any = None, *, name: str | None = None) -> Any:
    """Register a function as a task: ``@task`` or ``@task(name="mail.bulk")``."""
    def register(fn: F) -> F:
        default_registry.add(fn, name)
        return fn
    return register(function) if function is not None else register


def bad_arguments(function: Callable[..., Any], args: list[Any] | dict[str, Any],
                  name: str | None, exc: TypeError) -> BadArguments | None:
    """What a ``TypeError`` from calling ``function(args)`` means: a :class:`BadArguments`
    when the arguments do not fit its signature, or None when the task itself raised it.

    Binding only on failure keeps the common path free of inspect: if the
    arguments cannot bind, the TypeError came from the call itself and the
    task never started.
    """
    reason = _binding_error(function, args)
    if reason is None:
        return None
    bad = BadArguments(f"{reason}; the signature is "
                       f"{_describe(function, name or function.__name__)}")
    bad.__cause__ = exc
    return bad


def _binding_error(function: Callable[..., Any], args: list[Any] | dict[str, Any]) -> str | None:
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # builtins without a signature
        return None
    try:
        if isinstance(args, dict):
            signature.bind(**args)
        else:
            signature.bind(*args)
    except TypeError as exc:
        return str(exc)
    return None


def _describe(function: Callable[..., Any], name: str) -> str:
    signature = inspect.signature(function)
    bare = signature.replace(
        parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
        return_annotation=signature.empty)
    return f"{name}{bare}"


#: Called first by :func:`progress` (set by the worker's task runner): yields to
#: the event loop, then raises ``Cancelled`` in a task its caller cancelled, so
#: ``progress()`` is a cancel point even in a loop that never yields otherwise.
_cancel_point: Callable[[], None] | None = None


def set_cancel_point(check: Callable[[], None] | None) -> None:
    """Make ``check`` the cancel point :func:`progress` calls (the task runner's)."""
    global _cancel_point
    _cancel_point = check


def progress(value: Any) -> None:
    """Send ``value`` (any JSON) as a progress line of the running task.

    Works in the task's greenlet and in greenlets it spawns. A no-op when the
    request did not ask for progress, or outside a task. In a worker it is a
    cooperative point: it yields to the event loop (so the line goes out and
    the process stays responsive), and in a cancelled task it raises
    ``greentask.Cancelled``.
    """
    if _cancel_point is not None:
        _cancel_point()
    sink = _progress_sink.get() or _spawner_sink()
    if sink is not None:
        sink(value)


def _spawner_sink() -> Callable[[Any], None] | None:
    # A greenlet starts with an empty context, so one that a task spawned does
    # not see the task's sink; gevent records who spawned each greenlet, so
    # look the sink up in the spawners' contexts. (Imported here: the master
    # must not load greenlet or gevent before it forks.)
    import greenlet

    current = greenlet.getcurrent()
    while True:
        spawner_ref = getattr(current, "spawning_greenlet", None)
        current = spawner_ref() if spawner_ref is not None else None
        if current is None:
            return None
        context = current.gr_context
        sink = context.get(_progress_sink) if context is not None else None
        if sink is not None:
            return sink


@contextmanager
def progress_sink(sink: Callable[[Any], None] | None) -> Iterator[None]:
    """Route ``progress()`` calls of the current greenlet to ``sink`` while the block runs."""
    token = _progress_sink.set(sink)
    try:
        yield
    finally:
        _progress_sink.reset(token)
