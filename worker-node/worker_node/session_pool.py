"""Sessions with several coordinators found through discovery.

A provider's node holds a session with up to `max_coordinators` coordinators of the market at
once (like a seller listing on several marketplaces): each coordinator routes to it directly, so
a request at any of them is served with no extra hop and no billing between coordinators, and
when one coordinator disappears the others keep routing while the node finds a replacement. The
engine's real load goes to every coordinator in heartbeats, and each session's heartbeat says
how many jobs per model the node runs for its other coordinators (sent early when they change),
so no coordinator counts the node's slots as all its own.

A session that breaks and cannot reconnect (give_up_after) is dropped and its coordinator
banned for `ban_s`; the pool then looks up the DHT for another.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from protocol.market import CoordinatorRecord
from worker_node.session import WorkerSession

log = logging.getLogger("agora.worker.pool")


class Finder(Protocol):
    """Where coordinators come from (worker_node.discovery.CoordinatorFinder on the DHT)."""

    async def find(self, exclude: set[str]) -> list[CoordinatorRecord]: ...

    async def forget(self, coordinator_id: str) -> None: ...


@dataclass
class _Member:
    record: CoordinatorRecord
    session: WorkerSession
    task: asyncio.Task[None]


class SessionPool:
    def __init__(
        self,
        finder: Finder,
        make_session: Callable[[str], WorkerSession],
        max_coordinators: int,
        ban_s: float = 60.0,
        rediscover_s: float = 5.0,
    ) -> None:
        self._finder = finder
        self._make_session = make_session  # gRPC target -> a session that gives up when lost
        self._max = max_coordinators
        self._ban_s = ban_s
        self._rediscover_s = rediscover_s  # how often to look for more while below the max
        self._members: dict[str, _Member] = {}
        self._banned: dict[str, float] = {}  # coordinator id -> until (monotonic)
        self._changed = asyncio.Event()
        self._chores: set[asyncio.Task[None]] = set()
        self.state = "discovering"

    @property
    def running_jobs(self) -> int:
        return sum(m.session.running_jobs for m in self._members.values())

    @property
    def coordinators(self) -> list[str]:
        return [m.record.grpc_target for m in self._members.values()]

    def notify(self) -> None:
        for member in self._members.values():
            member.session.notify()

    def jobs_elsewhere(self, session: WorkerSession, model: str) -> int:
        """The node's jobs for `model` that came through sessions other than `session`."""
        members = self._members.values()
        return sum(m.session.jobs_for(model) for m in members if m.session is not session)

    def _jobs_changed(self, session: WorkerSession) -> None:
        for member in self._members.values():
            if member.session is not session:
                member.session.notify()

    async def run(self, stop: asyncio.Event) -> None:
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                if len(self._members) < self._max:
                    await self._fill(stop)
                self.state = f"connected to {len(self._members)} coordinator(s)"
                self._changed.clear()
                changed = asyncio.create_task(self._changed.wait())
                await asyncio.wait([stopping, changed], timeout=self._rediscover_s,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                changed.cancel()
            self.state = "draining"
            await asyncio.gather(*(m.task for m in self._members.values()),
                                 return_exceptions=True)  # fmt: skip
        finally:
            stopping.cancel()
            for member in self._members.values():
                member.task.cancel()
            self.state = "stopped"

    async def _fill(self, stop: asyncio.Event) -> None:
        now = time.monotonic()
        self._banned = {c: until for c, until in self._banned.items() if until > now}
        found = await self._finder.find(exclude=set(self._members) | set(self._banned))
        for record in found[: self._max - len(self._members)]:
            session = self._make_session(record.grpc_target)
            session.jobs_elsewhere = functools.partial(self.jobs_elsewhere, session)
            session.on_jobs_changed = functools.partial(self._jobs_changed, session)
            task = asyncio.create_task(session.run(stop))
            self._members[record.coordinator_id] = _Member(record, session, task)
            task.add_done_callback(functools.partial(self._lost, record.coordinator_id, stop))
            log.info("session with coordinator %s at %s", record.coordinator_id,
                     record.grpc_target)  # fmt: skip

    def _lost(self, coordinator_id: str, stop: asyncio.Event, _task: asyncio.Task[None]) -> None:
        if stop.is_set():
            return
        member = self._members.pop(coordinator_id, None)
        if member is not None:
            with contextlib.suppress(asyncio.CancelledError):
                error = member.task.exception()
                if error is not None:
                    log.warning("session with %s ended: %s", coordinator_id, error)
        self._banned[coordinator_id] = time.monotonic() + self._ban_s
        log.warning("lost coordinator %s; looking for another", coordinator_id)
        forgetting = asyncio.get_running_loop().create_task(self._finder.forget(coordinator_id))
        self._chores.add(forgetting)
        forgetting.add_done_callback(self._chores.discard)
        self._changed.set()
