"""AsyncTaskHandle: what a coroutine awaits for one task's result and progress."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

from greentask.calls import Call


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
    """Resolve ``waiter`` unless it is done already (timed out, or its task cancelled)."""
    if not waiter.done():
        waiter.set_result(None)
