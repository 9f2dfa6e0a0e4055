"""AsyncTaskClient against real daemons, under asyncio's default loop and under uvloop."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
import trustme
import uvloop

from greentask import (
    AsyncTaskClient,
    Cancelled,
    ConnectionFailed,
    TaskError,
    TaskTimeout,
    Unauthorized,
    UnknownFunction,
    WorkerLost,
    tls,
)

from .conftest import Daemon, free_port, write_version_module

pytestmark = pytest.mark.timeout(90)

TOKEN = "s3cret-token-for-the-aio-tests-0123456789"
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory) -> Iterator[Daemon]:
    """One daemon for this module's tests that leave its workers as they found them
    (those that kill one start their own)."""
    daemon = Daemon(tmp_path_factory.mktemp("aio")).start()
    yield daemon
    daemon.stop()


@pytest.fixture(params=sorted(LOOPS))
def run(request) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Run a coroutine to its end on a new loop of the parametrised kind."""
    def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(coroutine)
    return run


async def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """wait_until for coroutines: poll without holding up the loop."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        await asyncio.sleep(0.05)


def worker_state(daemon, pid: int) -> str | None:
    return next((w["state"] for w in daemon.status()["workers"] if w["pid"] == pid), None)


def cancelled_count(daemon) -> int:
    return sum(worker["cancelled"] for worker in daemon.status()["workers"])


def test_import_greentask_loads_asyncio_only_for_the_asyncio_client():
    probe = ("import sys, greentask; before = 'asyncio' in sys.modules; "
             "greentask.AsyncTaskClient; print(before, 'asyncio' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=30, check=True)
    assert result.stdout.split() == ["False", "True"]


def test_results_and_remote_errors_arrive_as_their_class(daemon, run):
    async def main():
        async with AsyncTaskClient([daemon.address]) as client:
            assert await client.call("echo", 1, 2) == [1, 2]
            assert await client.call("echo", a=1) == {"a": 1}
            assert await (await client.apply("echo", {"timeout": 3})) == {"timeout": 3}
            with pytest.raises(TaskError, match="RuntimeError: nope"):
                await client.call("fail", "nope")
            with pytest.raises(UnknownFunction):
                await client.call("missing")
            with pytest.raises(TaskTimeout, match=r"ran longer than 0\.2 s"):
                await client.call("sleep", 5, timeout=0.2)
            handle = await client.submit("sleep", 1)
            with pytest.raises(TaskTimeout, match=r"no reply to task .sleep. within 0\.1 s"):
                await handle.result(timeout=0.1)
            assert await handle.result(timeout=5) == 1
            with pytest.raises(TypeError, match="not both"):
                await client.submit("echo", 1, a=2)
    run(main())


def test_a_client_belongs_to_the_loop_that_first_used_it(daemon):
    client = AsyncTaskClient([daemon.address])  # made before any loop runs, as at import

    async def echo(close: bool = False):
        try:
            return await client.call("echo", 1)
        finally:
            if close:
                await client.close()

    with asyncio.Runner() as first:
        assert first.run(echo()) == [1]
        with asyncio.Runner() as second, pytest.raises(RuntimeError, match="one client per"):
            second.run(echo())
    # Once its loop is closed, a new loop may take it over.
    assert asyncio.run(echo(close=True)) == [1]


def test_ten_thousand_concurrent_calls_from_one_loop(daemon, run):
    async def main():
        async with AsyncTaskClient([daemon.address], timeout=60) as client:
            results = await asyncio.gather(*(client.call("echo", i) for i in range(10_000)))
            assert results == [[i] for i in range(10_000)]
            assert len(client._pool.connections) == 2  # shared, not one per coroutine
    run(main())


def test_progress_comes_in_order_by_iteration_and_by_callback(daemon, run):
    async def main():
        seen = []
        async with AsyncTaskClient([daemon.address]) as client:
            handle = await client.submit("steps.count", 5, 0.01, progress=True,
                                         on_progress=seen.append)
            iterated = [value async for value in handle.progress()]
            assert await handle == 5
            # Without progress=True there is nothing to iterate, and it says so.
            quiet = await client.submit("steps.count", 2)
            with pytest.raises(RuntimeError, match="progress=True"):
                async for _ in quiet.progress():
                    pass
            assert await quiet == 2
        return iterated, seen
    iterated, seen = run(main())
    assert iterated == seen == [{"step": i} for i in range(1, 6)]


def test_failover_to_the_second_server_and_connection_failed_when_none_is_up(daemon, run):
    down = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]

    async def main():
        async with AsyncTaskClient([down[0], daemon.address]) as client:
            for _ in range(10):
                assert await client.call("echo", "ok") == ["ok"]
        async with AsyncTaskClient(down) as client:
            with pytest.raises(ConnectionFailed, match="cannot connect to any task server") \
                    as info:
                await client.call("echo")
        assert all(address in str(info.value) for address in down)
    run(main())


def test_worker_lost_when_the_worker_dies_mid_task_and_retry_resends(make_daemon, run):
    daemon = make_daemon()

    async def killed_mid_task(seconds: float, retry: bool) -> Any:
        async with AsyncTaskClient([daemon.address], connections_per_server=1) as client:
            pid = await client.call("pid")
            handle = await client.submit("sleep", seconds, retry=retry)
            await until(lambda: daemon.inflight() == 1, 10, "the task to run")
            os.kill(pid, signal.SIGKILL)
            return await handle.result(timeout=10), handle.attempts

    with pytest.raises(WorkerLost, match="retry=True"):
        run(killed_mid_task(5, retry=False))
    assert run(killed_mid_task(0.5, retry=True)) == (0.5, 2)


def test_shutting_down_and_closing_are_sent_again_elsewhere(make_daemon, run):
    daemon = make_daemon()

    async def main():
        async with AsyncTaskClient([daemon.address], connections_per_server=1) as client:
            pid = await client.call("pid")
            busy = await client.submit("sleep", 1)
            await until(lambda: daemon.inflight() == 1, 10, "the task to run")
            os.kill(pid, signal.SIGTERM)  # the worker drains: closing, then ShuttingDown
            await until(lambda: worker_state(daemon, pid) == "draining", 10,
                        "the worker to drain")
            assert await client.call("pid") != pid
            assert await busy == 1
    run(main())


def test_a_reload_under_200_coroutines_loses_nothing(versioned):
    daemon, modules = versioned
    errors, results = [], []

    async def caller(client, stop):
        while not stop.is_set():
            try:
                results.append(await client.call("version"))
            except Exception as exc:  # counted: the test asserts there are none
                errors.append(repr(exc))

    async def main():
        stop = asyncio.Event()
        async with AsyncTaskClient([daemon.address], timeout=20) as client:
            callers = [asyncio.create_task(caller(client, stop)) for _ in range(200)]
            for version in range(2, 5):
                await asyncio.sleep(1)
                write_version_module(modules, version)
                daemon.signal(signal.SIGHUP)
            await asyncio.sleep(1)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*callers), 30)
            deadline = time.monotonic() + 10
            while await client.call("version") != 4:
                assert time.monotonic() < deadline, "the last generation never served"
                await asyncio.sleep(0.05)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())
    assert errors == []
    assert len(results) > 1000 and set(results) <= {1, 2, 3, 4}
    assert daemon.log().count("SIGHUP: reloading") == 3


def test_cancel_by_the_handle_by_task_cancel_and_by_asyncio_timeout(daemon, run):
    async def main():
        async with AsyncTaskClient([daemon.address]) as client:
            before = cancelled_count(daemon)
            handle = await client.submit("cleans_up", 60)
            await until(lambda: daemon.inflight() == 1, 10, "the task to run")
            await handle.cancel()
            with pytest.raises(Cancelled) as info:
                await handle
            assert info.value.result["cleaned"] is True
            # Cancelling the coroutine that awaits the call cancels the task.
            waiting = asyncio.create_task(client.call("sleep", 60))
            await until(lambda: daemon.inflight() == 1, 10, "the task to run")
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await until(lambda: daemon.inflight() == 0, 10, "the cancelled task to end")
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await client.call("sleep", 60)
            await until(lambda: daemon.inflight() == 0, 10, "the timed-out task to end")
            assert await client.call("echo", "after") == ["after"]
            assert cancelled_count(daemon) - before == 3
    run(main())


def test_token_and_tls(make_daemon, tmp_path, run):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    certfile, keyfile, ca_file = tmp_path / "s.pem", tmp_path / "s.key", tmp_path / "ca.pem"
    server.cert_chain_pems[0].write_to_path(str(certfile))
    server.private_key_pem.write_to_path(str(keyfile))
    keyfile.chmod(0o600)
    ca.cert_pem.write_to_path(str(ca_file))
    daemon = make_daemon(auth_token_file=token_file, certfile=certfile, keyfile=keyfile)
    context = tls.client_context(str(ca_file))

    async def main():
        async with AsyncTaskClient([daemon.address], auth_token=TOKEN,
                                   ssl_context=context) as client:
            results = await asyncio.gather(*(client.call("echo", i) for i in range(500)))
            assert results == [[i] for i in range(500)]
        async with AsyncTaskClient([daemon.address], auth_token="wrong-token-0123456789",
                                   ssl_context=context) as client:
            outcomes = await asyncio.gather(*(client.call("echo", i) for i in range(5)),
                                            return_exceptions=True)
            assert all(isinstance(outcome, Unauthorized) for outcome in outcomes), outcomes
        async with AsyncTaskClient([daemon.address], auth_token=TOKEN,
                                   ssl_context=tls.client_context(), connect_timeout=3) as client:
            with pytest.raises(ConnectionFailed, match="TLS certificate was not accepted"):
                await client.call("echo", 1)
    run(main())


def runqueue_wait() -> float:
    """Seconds this thread has waited for a CPU (kernel schedstat): time the
    machine, not the loop, made it late."""
    with open(f"/proc/self/task/{os.getpid()}/schedstat") as stats:
        return int(stats.read().split()[1]) / 1e9


def test_the_loop_is_never_blocked_while_1000_calls_run(daemon, run):
    # What is measured is the client, not a full collection of pytest's own
    # heap (a server freezes its start-up heap the same way: gc.freeze()).
    gc.freeze()
    async def ticker(stop, lateness, blocked):
        while not stop.is_set():
            started, waited, worked = time.monotonic(), runqueue_wait(), time.thread_time()
            await asyncio.sleep(0.01)
            # Late by what the loop itself spent, not by waiting for a CPU
            # beside other processes; and of that, the time it did not run
            # at all (a blocking call), which a busy machine cannot stretch.
            late = time.monotonic() - started - 0.01 - (runqueue_wait() - waited)
            lateness.append(late)
            blocked.append(late - (time.thread_time() - worked))

    async def main():
        stop, lateness, blocked = asyncio.Event(), [], []
        async with AsyncTaskClient([daemon.address], timeout=60) as client:
            await client.call("echo", "warm")
            tick = asyncio.create_task(ticker(stop, lateness, blocked))
            for _ in range(3):
                calls = [client.call("echo", "x" * 1000, i) for i in range(1000)]
                calls += [client.call("sleep", 0.05) for _ in range(10)]
                await asyncio.gather(*calls)
            stop.set()
            await tick
        return lateness, blocked
    try:
        lateness, blocked = run(main())
    finally:
        gc.unfreeze()
    assert len(lateness) >= 5
    assert max(blocked) < 0.05, sorted(blocked)[-5:]  # never waiting on a blocking call
    # and never a long stretch of work in one turn (one outlier allowed: a
    # loaded machine slows the work itself, which no counter subtracts).
    assert sorted(lateness)[-2] < 0.05, sorted(lateness)[-5:]
