"""The node's HTTP connections to its engines.

Jobs stream through aiohttp: its C parser (llhttp) reads an engine's SSE for ~9 µs of CPU per
event where httpx (httpcore, h11 and anyio's cancel scopes per read) took ~63 µs, measured
side by side on one machine (64 streams of 128 tokens, 7 ms apart). At the 9,000 to 18,000
tokens/s of one GPU, httpx was most of the node's one core. Probes (metrics, model info, a
few per second at most) keep a small httpx client.

A job holds one of `HEADROOM * max_concurrency` slots while its engine call runs; the
connector keeps one kept-alive connection per slot, so nothing is opened per request. The
coordinators already keep a node within max_concurrency; the headroom absorbs the moments when
their views lag (another coordinator's jobs reach it by heartbeat; a cancelled job is still
winding down), and the engine queues what it cannot run yet. A job that waits `POOL_WAIT_S`
for a slot is refused as full (back-pressure, not a fault).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import httpx

from worker_node.errors import EngineFull

POOL_WAIT_S = 5.0  # a job waits this long for an engine slot, then is refused (full)
HEADROOM = 2  # slots per advertised job slot (see above)
PROBE_CONNECTIONS = 4  # beside the jobs: metrics reads and model probes
# under the engine's own keep-alive timeout (uvicorn's 5 s, vLLM's default), so an idle
# connection is dropped here before the engine closes it under a request
KEEPALIVE_S = 4.0


class EngineClients:
    def __init__(self, max_concurrency: int) -> None:
        slots = HEADROOM * max(1, max_concurrency)
        self._slots = asyncio.Semaphore(slots)
        connector = aiohttp.TCPConnector(
            limit=slots, limit_per_host=0, keepalive_timeout=KEEPALIVE_S
        )
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        self.jobs = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        )
        probe_limits = httpx.Limits(max_connections=PROBE_CONNECTIONS)
        self.probes = httpx.AsyncClient(timeout=httpx.Timeout(30, connect=10), limits=probe_limits)

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[aiohttp.ClientSession]:
        """The session for one job's engine call, while the job holds a slot; EngineFull if
        no slot frees up in time."""
        try:
            async with asyncio.timeout(POOL_WAIT_S):
                await self._slots.acquire()
        except TimeoutError:
            raise EngineFull(f"every engine connection stayed busy for {POOL_WAIT_S:g} s") from None
        try:
            yield self.jobs
        finally:
            self._slots.release()

    async def __aenter__(self) -> EngineClients:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.jobs.close()
        await self.probes.aclose()
