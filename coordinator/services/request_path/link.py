"""The seam between the request path and the workers: `open_job(job) -> JobStream`.

A `WorkerLink` is how the coordinator reaches one worker, as httpx's Transport is how a client
reaches the network. The gRPC session is one implementation (`SessionLink`: jobs go down the
worker's stream, events come back up and are delivered here); `HandlerLink` runs an async
generator in-process instead, so the whole request path (failover, continuation, stalls,
overload, settlement) is tested in milliseconds without a network.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from protocol.proto import session_pb2 as pb


class JobStream(Protocol):
    """The events of one job on one worker, in order; ends after a receipt or an error."""

    def __aiter__(self) -> JobStream: ...

    async def __anext__(self) -> pb.JobEvent: ...

    def pending(self) -> bool:
        """An event is already waiting (the relay then joins it into the same write)."""
        ...

    def close(self, *, cancel: bool) -> None:
        """Stop listening (idempotent); `cancel` also tells the worker to stop the job."""
        ...


class WorkerLink(Protocol):
    def open_job(self, job: pb.Job) -> JobStream: ...

    def close(self, reason: str) -> None:
        """The worker is gone: its running jobs end with a retryable `worker_lost` error."""
        ...


class QueuedJob:
    """A job whose events are pushed into a queue by whoever hears from the worker."""

    def __init__(self, on_close: Callable[[bool], None]) -> None:
        self.events: asyncio.Queue[pb.JobEvent] = asyncio.Queue()
        self._on_close = on_close
        self.closed = False

    def __aiter__(self) -> QueuedJob:
        return self

    async def __anext__(self) -> pb.JobEvent:
        return await self.events.get()

    def pending(self) -> bool:
        return not self.events.empty()

    def close(self, *, cancel: bool) -> None:
        if not self.closed:
            self.closed = True
            self._on_close(cancel)


class SessionLink:
    """A worker's gRPC session as a link: jobs are queued on its outbox (the response stream
    of `Connect`), its job events are delivered here by the session's read loop."""

    def __init__(self) -> None:
        self.outbox: asyncio.Queue[pb.CoordinatorMessage | None] = asyncio.Queue()
        self._jobs: dict[str, QueuedJob] = {}
        self.closed = False

    def open_job(self, job: pb.Job) -> QueuedJob:
        request_id = job.request_id

        def closed(cancel: bool) -> None:
            self._jobs.pop(request_id, None)
            if cancel and not self.closed:
                message = pb.CoordinatorMessage(cancel=pb.CancelJob(request_id=request_id))
                self.outbox.put_nowait(message)

        queued = QueuedJob(closed)
        if self.closed:
            queued.events.put_nowait(_lost(request_id, "worker session ended"))
            return queued
        self._jobs[request_id] = queued
        self.outbox.put_nowait(pb.CoordinatorMessage(job=job))
        return queued

    def deliver(self, event: pb.JobEvent) -> None:
        queued = self._jobs.get(event.request_id)
        if queued is not None:
            queued.events.put_nowait(event)

    def close(self, reason: str) -> None:
        """The session ended: every job still running on it fails with a retryable error."""
        self.closed = True
        self.outbox.put_nowait(None)  # ends the session's response stream
        for request_id, queued in list(self._jobs.items()):
            queued.events.put_nowait(_lost(request_id, reason))


def _lost(request_id: str, reason: str) -> pb.JobEvent:
    error = pb.JobError(http_status=502, message=reason, type="worker_lost", retryable=True)
    return pb.JobEvent(request_id=request_id, error=error)


JobHandler = Callable[[pb.Job], AsyncIterator[pb.JobEvent]]


class HandlerLink:
    """A worker played by an async generator, in-process (tests, benchmarks of the path)."""

    def __init__(self, handler: JobHandler) -> None:
        self._handler = handler
        self.jobs: list[pb.Job] = []  # every job opened, in order
        self.cancelled: list[str] = []  # request ids the path cancelled
        self._running: dict[str, QueuedJob] = {}

    def close(self, reason: str) -> None:
        for request_id, queued in list(self._running.items()):
            queued.events.put_nowait(_lost(request_id, reason))

    def open_job(self, job: pb.Job) -> QueuedJob:
        self.jobs.append(job)

        def closed(cancel: bool) -> None:
            self._running.pop(job.request_id, None)
            if cancel:
                self.cancelled.append(job.request_id)
            task.cancel()

        queued = QueuedJob(closed)
        self._running[job.request_id] = queued

        async def run() -> None:
            try:
                async for event in self._handler(job):
                    queued.events.put_nowait(event)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a handler that breaks is a worker lost mid-job
                queued.events.put_nowait(_lost(job.request_id, f"handler failed: {exc!r}"))

        task = asyncio.get_running_loop().create_task(run())
        return queued
