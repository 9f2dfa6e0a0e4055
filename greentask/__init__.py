"""greentask: offload slow work to a pool of forked gevent processes over TCP.

Define tasks with ``@task``, report with ``progress()``, call them with
``TaskClient``. Importing this package does not import gevent, so the master
process can fork before a hub exists.
"""

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

__version__ = "0.1.0"

__all__ = [
    "BadArguments", "BadRequest", "Cancelled", "ConfigError", "ConnectionFailed", "GreentaskError",
    "RemoteError", "ShuttingDown", "TaskClient", "TaskError", "TaskHandle", "TaskTimeout",
    "TooLarge", "Unauthorized", "UnknownFunction", "WorkerLost", "progress", "task",
]
