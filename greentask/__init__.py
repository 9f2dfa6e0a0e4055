"""greentask: offload slow work to a pool of forked gevent processes over TCP.

Define tasks with ``@task``, report with ``progress()``, call them with
``TaskClient`` (threads, greenlets) or ``AsyncTaskClient`` (asyncio).
Importing this package imports neither gevent, so the master process can
fork before a hub exists, nor asyncio, which only ``AsyncTaskClient`` loads.
"""

from typing import TYPE_CHECKING, Any

from greentask.client import TaskClient, TaskHandle
from greentask.errors import (
    BadArguments,
    BadRequest,
    Cancelled,
    ConfigError,
    ConnectionFailed,
    GreentaskError,
    RemoteError,
    ShuttingDown,
    TaskError,
    TaskTimeout,
    TooLarge,
    Unauthorized,
    UnknownFunction,
    WorkerLost,
)
from greentask.registry import progress, task

if TYPE_CHECKING:
    from greentask.aio import AsyncTaskClient, AsyncTaskHandle

__version__ = "0.1.0"

__all__ = [
    "AsyncTaskClient", "AsyncTaskHandle", "BadArguments", "BadRequest", "Cancelled",
    "ConfigError", "ConnectionFailed", "GreentaskError", "RemoteError", "ShuttingDown",
    "TaskClient", "TaskError", "TaskHandle", "TaskTimeout", "TooLarge", "Unauthorized",
    "UnknownFunction", "WorkerLost", "progress", "task",
]


def __getattr__(name: str) -> Any:
    # The asyncio client is loaded on first use (PEP 562): gevent processes
    # that import greentask do not pay for asyncio.
    if name in ("AsyncTaskClient", "AsyncTaskHandle"):
        from greentask import aio
        return getattr(aio, name)
    raise AttributeError(f"module 'greentask' has no attribute {name!r}")
