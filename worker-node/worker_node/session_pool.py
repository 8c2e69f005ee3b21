"""Sessions with several coordinators found through discovery.

A provider's node holds a session with up to `max_coordinators` coordinators of the market at
once (like a seller listing on several marketplaces): each coordinator routes to it directly, so
a request at any of them is served with no extra hop and no billing between coordinators, and
when one coordinator disappears the others keep routing while the node finds a replacement. The
engine's real load goes to every coordinator in heartbeats, and each session's heartbeat says
how many jobs per model the node runs for its other coordinators (sent early when they change),
so no coordinator counts the node's slots as all its own.

A coordinator served by several processes (`agora coordinator --processes N`) names the others
when the node registers; the pool holds a session with each of them too (its "siblings": they
count as one coordinator towards `max_coordinators`).

A session that breaks and cannot reconnect (give_up_after) is dropped and its coordinator
banned for `ban_s`; the pool then looks up the DHT for another. A node configured with one
coordinator address uses the same pool with a `FixedCoordinator` finder.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from protocol.market import CoordinatorRecord, DemandBoard
from worker_node.session import WorkerSession

log = logging.getLogger("agora.worker.pool")


class Finder(Protocol):
    """Where coordinators come from (worker_node.discovery.CoordinatorFinder on the DHT)."""

    async def find(self, exclude: set[str]) -> list[CoordinatorRecord]: ...

    async def forget(self, coordinator_id: str) -> None: ...


class FixedCoordinator:
    """The one coordinator a node's config names (no discovery): its record is local, never
    signed or announced, and carries only what the pool uses (the address)."""

    def __init__(self, target: str) -> None:
        self._record = CoordinatorRecord(
            coordinator_id=target, grpc_target=target, api_url="", models=(),
            issued_at_ms=0, expires_at_ms=2**63 - 1,
        )  # fmt: skip

    async def find(self, exclude: set[str]) -> list[CoordinatorRecord]:
        return [] if self._record.coordinator_id in exclude else [self._record]

    async def forget(self, coordinator_id: str) -> None:
        """Nothing to forget: the config names it."""


@dataclass
class _Member:
    record: CoordinatorRecord  # grpc_target: this session's address
    session: WorkerSession
    task: asyncio.Task[None]
    sibling: bool = False  # another process of a coordinator the pool already holds


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
        self._members: dict[str, _Member] = {}  # by gRPC target
        self._banned: dict[str, float] = {}  # coordinator id -> until (monotonic)
        self._changed = asyncio.Event()
        self._chores: set[asyncio.Task[None]] = set()
        self._fixed = isinstance(finder, FixedCoordinator)  # no discovery: one named coordinator
        self._fatal: BaseException | None = None  # why a fixed coordinator's session ended
        self._phase = "connecting" if self._fixed else "discovering"

    @classmethod
    def for_coordinator(
        cls, target: str, make_session: Callable[[str], WorkerSession]
    ) -> SessionPool:
        """The sessions with the one coordinator a node's config names (and its other
        processes): the session retries for ever, and a refused registration ends the pool."""
        return cls(FixedCoordinator(target), make_session, max_coordinators=1)

    @property
    def state(self) -> str:
        if self._phase != "running":
            return self._phase
        primaries = [m for m in self._members.values() if not m.sibling]
        if self._fixed and primaries:
            return primaries[0].session.state
        return f"connected to {len(primaries)} coordinator(s)"

    @property
    def running_jobs(self) -> int:
        return sum(m.session.running_jobs for m in self._members.values())

    @property
    def coordinators(self) -> list[str]:
        return [m.record.grpc_target for m in self._members.values()]

    def notify(self) -> None:
        for member in self._members.values():
            member.session.notify()

    def readvertise(self) -> None:
        """The node's asks moved: every session advertises again."""
        for member in self._members.values():
            member.session.readvertise()

    async def boards(self) -> list[DemandBoard]:
        """The demand board of every coordinator process the node holds a session with (each
        counts the requests it saw: together they are the demand this node can serve)."""
        found = await asyncio.gather(*(m.session.board() for m in self._members.values()))
        return [board for board in found if board is not None]

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
                if self._fatal is not None:
                    raise self._fatal
                if self._coordinator_count() < self._max:
                    await self._fill(stop)
                self._phase = "running"
                self._changed.clear()
                changed = asyncio.create_task(self._changed.wait())
                await asyncio.wait([stopping, changed], timeout=self._rediscover_s,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                changed.cancel()
            self._phase = "draining"
            await asyncio.gather(*(m.task for m in self._members.values()),
                                 return_exceptions=True)  # fmt: skip
        finally:
            stopping.cancel()
            for member in self._members.values():
                member.task.cancel()
            self._phase = "stopped"

    def _coordinator_count(self) -> int:
        return sum(1 for m in self._members.values() if not m.sibling)

    async def _fill(self, stop: asyncio.Event) -> None:
        now = time.monotonic()
        self._banned = {c: until for c, until in self._banned.items() if until > now}
        held = {m.record.coordinator_id for m in self._members.values()}
        found = await self._finder.find(exclude=held | set(self._banned))
        for record in found[: self._max - self._coordinator_count()]:
            self._start(record, stop, sibling=False)
            log.info("session with coordinator %s at %s", record.coordinator_id,
                     record.grpc_target)  # fmt: skip

    def _start(self, record: CoordinatorRecord, stop: asyncio.Event, sibling: bool) -> None:
        session = self._make_session(record.grpc_target)
        session.jobs_elsewhere = functools.partial(self.jobs_elsewhere, session)
        session.on_jobs_changed = functools.partial(self._jobs_changed, session)
        session.on_siblings = functools.partial(self._siblings, record, sibling, stop)
        task = asyncio.create_task(session.run(stop))
        self._members[record.grpc_target] = _Member(record, session, task, sibling)
        task.add_done_callback(functools.partial(self._lost, record.grpc_target, stop))

    def _siblings(
        self, record: CoordinatorRecord, from_sibling: bool, stop: asyncio.Event,
        targets: list[str],
    ) -> None:  # fmt: skip
        """A session registered and its coordinator named its other processes."""
        if stop.is_set():
            return
        for target in targets:
            if target not in self._members:
                self._start(dataclasses.replace(record, grpc_target=target), stop, sibling=True)
                log.info("session with %s: another process of coordinator %s", target,
                         record.coordinator_id)  # fmt: skip
        if from_sibling:
            return
        for target, member in list(self._members.items()):  # the coordinator runs fewer now
            same = member.record.coordinator_id == record.coordinator_id
            if member.sibling and same and target not in targets:
                member.task.cancel()

    def _lost(self, target: str, stop: asyncio.Event, task: asyncio.Task[None]) -> None:
        if stop.is_set():
            return
        member = self._members.get(target)
        if member is None or member.task is not task:
            return
        del self._members[target]
        coordinator_id = member.record.coordinator_id
        if member.sibling:  # its coordinator names it again at the next registration if needed
            log.info("session with %s (a process of coordinator %s) ended", target,
                     coordinator_id)  # fmt: skip
            return
        error = None
        with contextlib.suppress(asyncio.CancelledError):
            error = task.exception()
            if error is not None:
                log.warning("session with %s ended: %s", coordinator_id, error)
        if self._fixed:  # it never gives up, so it ended on an error the node must report
            self._fatal = error or ConnectionError(f"session with {coordinator_id} ended")
            self._changed.set()
            return
        self._banned[coordinator_id] = time.monotonic() + self._ban_s
        log.warning("lost coordinator %s; looking for another", coordinator_id)
        forgetting = asyncio.get_running_loop().create_task(self._finder.forget(coordinator_id))
        self._chores.add(forgetting)
        forgetting.add_done_callback(self._chores.discard)
        self._changed.set()
