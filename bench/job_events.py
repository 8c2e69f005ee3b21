"""Per-event cost of a job's event stream on the coordinator: asyncio.Queue under
asyncio.timeout (the old QueuedJob) vs the deque-and-one-waiter QueuedJob, on uvloop.

    .venv/bin/python bench/job_events.py

On a GPU each event is about one token of one stream, so this runs per token per stream.
"""

from __future__ import annotations

import asyncio
import time

import uvloop

from coordinator.services.request_path.link import QueuedJob

N = 200_000


async def queue_under_timeout() -> float:
    events: asyncio.Queue[int] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def produce(i: int) -> None:
        events.put_nowait(i)
        if i + 1 < N:
            loop.call_soon(produce, i + 1)

    loop.call_soon(produce, 0)
    start = time.process_time()
    for _ in range(N):
        async with asyncio.timeout(30):
            await events.get()
    return time.process_time() - start


async def queued_job() -> float:
    job = QueuedJob(lambda _cancel: None)
    loop = asyncio.get_running_loop()

    def produce(i: int) -> None:
        job.push(i)  # type: ignore[arg-type]  # any value: the stream does not look inside
        if i + 1 < N:
            loop.call_soon(produce, i + 1)

    loop.call_soon(produce, 0)
    start = time.process_time()
    for _ in range(N):
        await job.next(30)
    return time.process_time() - start


if __name__ == "__main__":
    for run in (queue_under_timeout, queued_job, queue_under_timeout, queued_job):
        print(f"{run.__name__:20s} {uvloop.run(run()) / N * 1e6:6.2f} µs of CPU per event")
