"""A FastAPI app that offloads the seed's bulk mail to greentask, with no broker.

Run it beside a daemon (``scripts/run`` starts one on 127.0.0.1:12345)::

    pip install fastapi uvicorn
    GREENTASK_SERVERS=127.0.0.1:12345 uvicorn greentask.examples.fastapi_app:app

- ``POST /bulk`` with ``{"recipients": ["a@example.org", ...]}`` starts
  ``send_bulk`` and answers 202 with the job's id at once;
- ``GET /bulk/{id}/events`` streams its progress as Server-Sent Events
  (``progress``, then ``done`` with the result or ``failed`` with the error);
- ``DELETE /bulk/{id}`` cancels it.

One :class:`greentask.AsyncTaskClient` serves every request: its connections
are opened once and shared, so an endpoint costs one pipelined line, not a
connection.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from greentask import AsyncTaskClient, AsyncTaskHandle, Cancelled, GreentaskError

#: Seconds a job stays readable after its timeout.
KEEP_FINISHED = 300.0


class Bulk(BaseModel):
    recipients: list[str] = Field(min_length=1, max_length=10_000)
    subject: str = "greentask"
    body: str = "Sent from a FastAPI endpoint through greentask."


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    servers = os.environ.get("GREENTASK_SERVERS", "127.0.0.1:12345").split(",")
    async with AsyncTaskClient(servers, timeout=600) as client:
        app.state.client = client
        app.state.jobs = {}
        yield


app = FastAPI(title="greentask from FastAPI", lifespan=lifespan)


@app.post("/bulk", status_code=202)
async def start_bulk(bulk: Bulk) -> dict[str, str]:
    """Start send_bulk and return its id; the work runs in a greentask worker."""
    handle = await app.state.client.submit("send_bulk", bulk.recipients, bulk.subject,
                                           bulk.body, progress=True)
    job_id = uuid.uuid4().hex
    app.state.jobs[job_id] = handle
    # Forgotten some time after its own timeout, whether anyone looked or not.
    asyncio.get_running_loop().call_later(handle.timeout + KEEP_FINISHED, app.state.jobs.pop,
                                          job_id, None)
    return {"id": job_id}


@app.get("/bulk/{job_id}/events")
async def bulk_events(job_id: str) -> StreamingResponse:
    """The job's progress, then its outcome, as Server-Sent Events.

    A viewer that goes away stops watching; the job goes on (cancel it with DELETE).
    """
    handle = _job(job_id)

    async def events() -> AsyncIterator[str]:
        async for value in handle.progress():
            yield _event("progress", value)
        try:
            yield _event("done", await handle)
        except GreentaskError as exc:
            failure = {"type": type(exc).__name__, "message": str(exc)}
            if isinstance(exc, Cancelled) and exc.result is not None:
                failure["result"] = exc.result  # what it had done when it stopped
            yield _event("failed", failure)

    return StreamingResponse(events(), media_type="text/event-stream")


@app.delete("/bulk/{job_id}")
async def cancel_bulk(job_id: str) -> dict[str, bool]:
    """Cancel the job; its event stream then ends with ``failed`` (Cancelled)."""
    handle = _job(job_id)
    finished = handle.done()
    await handle.cancel()
    return {"cancelling": not finished}


def _job(job_id: str) -> AsyncTaskHandle:
    handle = app.state.jobs.get(job_id)
    if handle is None:
        raise HTTPException(404, f"no job {job_id!r} (jobs are kept "
                                 f"{KEEP_FINISHED:g} s past their timeout)")
    return handle


def _event(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"

