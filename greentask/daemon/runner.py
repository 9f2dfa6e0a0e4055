"""The task-execution seam of a worker process: permits, greenlets, deadlines, outcomes.

Theory of operation
-------------------
A :class:`TaskRunner` runs every task of its process. A connection hands it
a parsed request, the task function and a :class:`TaskOwner` (what to send
the replies to); the runner waits for one of ``[worker] concurrency`` task
permits (a reader that cannot get one stops reading: backpressure), runs
the task in the caller's greenlet (or, for a caller that cannot hand its
other work over when the task waits, in a reused greenlet), bounds it
with a deadline, sends its progress and final reply to the owner, counts the
outcome once, and tells the owner the task is done.

A task's deadline is one of the two strategies of
:mod:`greentask.daemon.deadlines`; the runner maps exactly the
:class:`~greentask.daemon.deadlines.Expired` meant for this run of the task
(it names the task's entry in :attr:`TaskRunner.running`) to a Timeout reply.

Every running task is in :attr:`TaskRunner.running`, by its greenlet, and
findable by ``(owner, request id)`` with :meth:`TaskRunner.find`, or by its
dashboard key (:mod:`greentask.daemon.activity`) with
:meth:`TaskRunner.cancel_key`. :meth:`TaskRunner.activity` is what the
dashboard sees: the oldest running tasks and the last failures.
"""

from __future__ import annotations

import collections
import heapq
import logging
import time
import traceback
from collections.abc import Callable
from time import monotonic
from typing import Any, Protocol

import gevent
import greenlet
import ujson
from gevent.lock import Semaphore
from greenlet import getcurrent

from greentask.daemon import scoreboard
from greentask.daemon.activity import FAILURES_KEPT, RUNNING_SHOWN, TaskKey, shown_progress
from greentask.daemon.deadlines import (
    COARSE_TIMEOUT_MIN,
    CancelOverdue,
    DeadlineSweep,
    Expired,
    TimerDeadline,
)
from greentask.daemon.greenlets import GreenletPool
from greentask.daemon.waiters import Waiters
from greentask.errors import Cancelled, RemoteError, TaskError, TaskTimeout
from greentask.protocol import Request, encode_error, encode_progress, encode_result
from greentask.registry import Registry, bad_arguments, progress_sink, set_cancel_point

log = logging.getLogger("greentask.worker")


class TaskOwner(Protocol):
    """What the runner needs from the connection a request came on."""

    #: Who sent the request (an address), for the log.
    peer: str

    def send(self, data: bytes) -> None:
        """Queue reply bytes (progress or the final line) for the peer."""

    def task_finished(self) -> None:
        """Called once per task, after its final reply was queued."""


#: One task in flight, by its greenlet in :attr:`TaskRunner.running`: the connection it
#: answers, its request and when it started (monotonic); a tuple, one per task, of any
#: length to mypyc, which reboxes a fixed-length one: a deadline knows its run by identity.
RunningTask = tuple[Any, ...]
#: Why a task is stopped, as its Cancelled error says.
BY_CALLER = "the task was cancelled by its caller"
BY_OPERATOR = "the task was cancelled from the dashboard"
#: The longest error message the dashboard's failures list keeps.
FAILURE_MESSAGE_MAX = 300


class TaskRunner:
    """Runs a process's tasks: permits, greenlet reuse, deadlines, outcome counting.

    ``slot`` is the process's scoreboard row (counts, in-flight gauge);
    ``on_recycle(reason)`` is called when ``max_tasks`` tasks have run.
    """

    def __init__(self, registry: Registry, slot: scoreboard.Slot, *, concurrency: int,
                 task_timeout: float, max_tasks: int = 0, measure_durations: bool = False,
                 debug: bool = False, on_recycle: Callable[[str], None] | None = None,
                 cancel_grace: float = 5.0) -> None:
        self.registry = registry
        self.cancel_grace = cancel_grace
        self.slot = slot
        self.max_tasks = max_tasks
        self.task_timeout = task_timeout
        self.measure_durations = measure_durations
        self.debug = debug
        self.on_recycle = on_recycle
        #: One permit per task that may run at once.
        self.permits = Semaphore(concurrency)
        self._acquire_permit = self.permits.acquire
        self._release_permit = self.permits.release
        self._set_inflight = slot.setter(scoreboard.INFLIGHT)
        self._count_task = slot.count_task
        #: Every task in flight, by the greenlet it runs in.
        self.running: dict[greenlet.greenlet, RunningTask] = {}
        self.sweep = DeadlineSweep(self.running, self._sweep_deadline)
        #: The greenlets of the tasks told to stop (with why), and of those already told.
        self.cancelling: dict[greenlet.greenlet, str] = {}
        self._told: set[greenlet.greenlet] = set()
        set_cancel_point(self._cancel_point)
        #: Who waits for the last task to finish (a drain).
        self._finished = Waiters()
        #: The reused greenlets tasks and connections run in.
        self.greenlets = GreenletPool()
        self.spawn = self.greenlets.spawn
        self._loop = gevent.get_hub().loop
        #: The event loop, if it tells how many watchers are ready and not yet
        #: run in this turn (``pendingcnt``: libev does, libuv does not).
        self.counting_loop: Any = self._loop if hasattr(type(self._loop), "pendingcnt") \
            else None
        #: The last progress value of each running task that reports progress.
        self.last_progress: dict[greenlet.greenlet, Any] = {}
        #: The last failures, newest last: (time.time(), function, error type, message).
        self.failures: collections.deque[tuple[float, str, str, str]] = collections.deque(
            maxlen=FAILURES_KEPT)

    # -- tasks -------------------------------------------------------------

    def submit(self, request: Request, function: Callable[..., Any], owner: TaskOwner,
               on_wait: Callable[[], None] | None = None) -> None:
        """Run ``request`` once a permit is free; its replies go to ``owner``.

        A request without an ``id`` runs in the calling greenlet (this
        returns after its reply is queued). One with an ``id`` runs in its
        own greenlet, unless the caller gives ``on_wait``: then it runs in the
        calling greenlet too, and ``on_wait()`` is called from the event loop
        if the task waits (for I/O, a sleep, a lock), so the caller can carry
        on its other work in another greenlet meanwhile.
        """
        self._acquire_permit()
        if request.id is None:
            self._run(request, function, owner)
        elif on_wait is None:
            self.spawn(self._run, request, function, owner)
        else:
            # Most tasks never wait: running them here saves two greenlet
            # switches and a loop callback, and the reply goes out before the
            # caller reads again (a round trip as short as a bare server's).
            # A callback runs only once this greenlet yields to the hub, so it
            # fires exactly when the task waits; a task that returns first
            # stops it.
            waited = self._loop.run_callback(on_wait)
            try:
                self._run(request, function, owner)
            finally:
                waited.stop()

    def find(self, owner: TaskOwner, request_id: Any) -> greenlet.greenlet | None:
        """The greenlet running the task of ``owner`` with ``request_id``, if any."""
        for task_greenlet, (task_owner, request, _) in self.running.items():
            if task_owner is owner and request.id == request_id:
                return task_greenlet
        return None

    def cancel(self, owner: TaskOwner, request_id: Any) -> bool:
        """Cancel ``owner``'s task ``request_id``; False if none runs (done, or never sent).

        :class:`~greentask.errors.Cancelled` is raised in the task at its next cooperative
        point; one still running ``cancel_grace`` seconds later is killed. Either way its
        final reply is a ``Cancelled`` error.
        """
        task_greenlet = self.find(owner, request_id)
        return task_greenlet is not None and self._stop(task_greenlet, BY_CALLER)

    def cancel_key(self, key: TaskKey) -> bool:
        """Cancel the running task with dashboard key ``key``; False when none runs."""
        for task_greenlet, entry in self.running.items():
            if (id(task_greenlet), round(entry[2] * 1e6)) == key:
                log.info("task %r (id %s, from %s) is cancelled from the dashboard",
                         entry[1].function, _request_id(entry[1]), entry[0].peer)
                return self._stop(task_greenlet, BY_OPERATOR)
        return False

    def _stop(self, task_greenlet: greenlet.greenlet, reason: str) -> bool:
        if task_greenlet in self.cancelling:
            return False
        entry = self.running[task_greenlet]
        self.cancelling[task_greenlet] = reason
        # From the hub, as gevent.kill does, and only if the greenlet still
        # runs this task: it may have finished (and taken another) meanwhile.
        self._loop.run_callback(self._interrupt, task_greenlet, entry, Cancelled(reason))
        gevent.spawn_later(self.cancel_grace, self._interrupt_late, task_greenlet, entry)
        return True

    def cancel_on_disconnect(self, owner: TaskOwner) -> None:
        """``owner``'s connection ended: cancel its tasks that asked for it."""
        for task_owner, request, _ in list(self.running.values()):
            if task_owner is owner and request.cancel_on_disconnect and request.id is not None:
                self.cancel(owner, request.id)

    def _interrupt(self, task_greenlet: greenlet.greenlet, entry: RunningTask,
                   exc: BaseException) -> None:
        if self.running.get(task_greenlet) is not entry:
            return  # finished meanwhile (and may run another task now)
        if isinstance(exc, Cancelled):
            if task_greenlet in self._told:
                return  # progress() told it first: once is enough, it is cleaning up
            self._told.add(task_greenlet)
        task_greenlet.throw(exc)

    def _cancel_point(self) -> None:
        # A switch first: a task that only computes between progress() calls
        # still lets its progress lines go out, its cancel line be read and
        # the heartbeat beat; a Cancelled thrown meanwhile is raised here.
        gevent.sleep(0)
        current = greenlet.getcurrent()
        if current in self.cancelling and current not in self._told:
            self._told.add(current)
            raise Cancelled(self.cancelling[current])

    def _interrupt_late(self, task_greenlet: greenlet.greenlet, entry: RunningTask) -> None:
        if self.running.get(task_greenlet) is entry:
            self._loop.run_callback(self._interrupt, task_greenlet, entry, CancelOverdue())

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no task runs; False if some still run after ``timeout`` seconds."""
        return self._finished.wait_until(lambda: not self.running, timeout)

    def kill_all(self) -> None:
        """Kill every running task (a drain ran out of time)."""
        for task_greenlet in list(self.running):
            gevent.kill(task_greenlet)

    def _run(self, request: Request, function: Callable[..., Any], owner: TaskOwner) -> None:
        # The hot path of every task: names are bound locally, and what most
        # tasks do not need (progress, cancelling, recycling) costs one test.
        current = getcurrent()
        running = self.running
        started = monotonic()
        run: RunningTask = (owner, request, started)  # typed: one object (RunningTask)
        running[current] = run
        set_inflight = self._set_inflight
        set_inflight(len(running))
        try:
            # Built elsewhere: a closure here makes its locals cells, slower on every task.
            sink = self._progress_sink(request, owner, current) if request.progress else None
            line, outcome = self._execute(request, function, sink, current, owner.peer, run)
            self._count_task(request.function, outcome)
            owner.send(line)
        finally:
            del running[current]
            if request.progress:
                self.last_progress.pop(current, None)
            if self.cancelling:
                self.cancelling.pop(current, None)
                self._told.discard(current)
            set_inflight(len(running))
            self._release_permit()
            if self._finished.anyone:
                self._finished.wake()
            owner.task_finished()
        if self.max_tasks:
            self._check_recycle()

    def _progress_sink(self, request: Request, owner: TaskOwner,
                       task_greenlet: greenlet.greenlet) -> Callable[[Any], None]:
        def sink(value: Any) -> None:
            self.last_progress[task_greenlet] = value
            owner.send(encode_progress(request.id, value))
        return sink

    def _limit(self, request: Request) -> float:
        """How long ``request`` may run: its own timeout, when under ``task_timeout``."""
        timeout = request.timeout
        return timeout if timeout is not None and timeout < self.task_timeout else self.task_timeout

    def _sweep_deadline(self, run: RunningTask) -> float | None:
        """When a running task's limit is up, if the sweep enforces it (None: a timer does)."""
        seconds = self._limit(run[1])
        return run[2] + seconds if seconds >= COARSE_TIMEOUT_MIN else None

    def _check_recycle(self) -> None:
        slot = self.slot
        if slot.get(scoreboard.DONE) + slot.get(scoreboard.FAILED) + \
                slot.get(scoreboard.TIMED_OUT) >= self.max_tasks and self.on_recycle:
            self.on_recycle(f"it has run max_tasks_per_child ({self.max_tasks}) tasks")

    def _execute(self, request: Request, function: Callable[..., Any],
                 sink: Callable[[Any], None] | None, current: greenlet.greenlet,
                 peer: str, run: RunningTask) -> tuple[bytes, int]:
        """Run one task within its limit; return its final reply line and its outcome.

        Every failure is logged (WARNING, one line, with the traceback when
        the task raised); the reply carries the traceback only with ``debug``.
        """
        seconds = self._limit(request)
        # A long limit is the sweep's, which reads self.running: nothing to arm.
        timer = TimerDeadline(seconds, run) if seconds < COARSE_TIMEOUT_MIN else None
        args = request.args  # _failure tells bad arguments from a task's own TypeError
        try:
            if sink is None:
                result = function(**args) if type(args) is dict else function(*args)
            else:
                with progress_sink(sink):
                    result = function(**args) if type(args) is dict else function(*args)
        except (Exception, SystemExit, CancelOverdue, Expired) as exc:
            if isinstance(exc, Expired) and exc.run is not run:
                raise  # not this task's deadline: someone else's to handle
            return self._failure(request, function, peer, exc, seconds)
        finally:
            if timer is not None:
                timer.cancel()
            if self.measure_durations:
                self.slot.observe(request.function, time.monotonic() - run[2])
        if current in self.cancelling:
            # Cancelled, it cleaned up and returned: what it returned is what it did.
            return encode_error(request.id, Cancelled(
                self.cancelling[current], result=result)), scoreboard.CANCELLED
        try:
            return encode_result(request.id, result), scoreboard.DONE
        except (TypeError, OverflowError) as exc:
            error = TaskError(
                f"task {request.function!r} returned a value that is not JSON ({exc}); "
                "return dicts, lists, strings, numbers, booleans or None")
            self._failed(request, peer, error)
            return encode_error(request.id, error), scoreboard.FAILED

    def _failure(self, request: Request, function: Callable[..., Any], peer: str,
                 exc: BaseException, seconds: float) -> tuple[bytes, int]:
        """The final reply line and outcome of a task that raised ``exc``; failures are logged."""
        if isinstance(exc, TypeError):
            exc = bad_arguments(function, request.args, request.function, exc) or exc
        if isinstance(exc, Cancelled):
            return encode_error(request.id, exc), scoreboard.CANCELLED
        if isinstance(exc, CancelOverdue):
            return encode_error(request.id, Cancelled(
                f"task {request.function!r} was cancelled and did not end within "
                f"{self.cancel_grace:g} s ([worker] cancel_grace), so it was stopped")), \
                scoreboard.CANCELLED
        if isinstance(exc, Expired):
            timeout = TaskTimeout(
                f"task {request.function!r} ran longer than {seconds:g} s and was stopped; "
                "raise the request's timeout or [worker] task_timeout, or make the task "
                "shorter")
            self._failed(request, peer, timeout)
            return encode_error(request.id, timeout), scoreboard.TIMED_OUT
        if isinstance(exc, RemoteError):
            self._failed(request, peer, exc)
            return encode_error(request.id, exc), scoreboard.FAILED
        self._failed(request, peer, exc, traceback_of=exc)
        return encode_error(request.id, self._task_error(exc)), scoreboard.FAILED

    def _task_error(self, exc: BaseException) -> TaskError:
        message = f"{type(exc).__name__}: {exc}"
        if self.debug:
            message += "\n" + "".join(traceback.format_exception(exc))
        return TaskError(message)

    def _failed(self, request: Request, peer: str, error: BaseException,
                traceback_of: BaseException | None = None) -> None:
        """One WARNING line per failed task (which task, which request, whose, why), and
        an entry in :attr:`failures`."""
        cause = f"failed: {error}" if traceback_of is None else \
            f"raised {type(error).__name__}: {error}"
        log.warning("task %r (id %s, from %s) %s", request.function, _request_id(request),
                    peer, cause, exc_info=traceback_of)
        kind, message = ((error.type, error.message) if isinstance(error, RemoteError)
                         else (type(error).__name__, str(error)))
        self.failures.append((time.time(), request.function, kind,
                              message[:FAILURE_MESSAGE_MAX]))

    # -- what the dashboard sees --------------------------------------------

    def activity(self) -> dict[str, Any]:
        """The oldest running tasks (function, age, progress, key) and the last failures.

        Never a task's arguments or result; its progress only as numbers,
        unless ``debug`` is on.
        """
        now = time.monotonic()
        oldest = heapq.nsmallest(RUNNING_SHOWN, self.running.items(), key=lambda item: item[1][2])
        running = [{"function": request.function, "age": now - started,
                    "key": [id(task_greenlet), round(started * 1e6)],
                    "progress": shown_progress(self.last_progress.get(task_greenlet),
                                               self.debug),
                    "cancelling": task_greenlet in self.cancelling}
                   for task_greenlet, (_, request, started) in oldest]
        failures = [{"at": at, "function": function, "error": kind, "message": message}
                    for at, function, kind, message in self.failures]
        return {"at": now, "running": running, "failures": failures}


def _request_id(request: Request) -> str:
    return "none" if request.id is None else ujson.dumps(request.id)
