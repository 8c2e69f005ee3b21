"""Live worker sessions, and per model the pool of offers that routing draws from.

A session's stats survive its disconnection (in services.stats): a flaky worker does not reset
its record by reconnecting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from billing.pricing import Price
from protocol.advert import Advert, ModelOffer
from protocol.market import RelayedRegistration
from protocol.proto import session_pb2 as pb


@dataclass(eq=False)
class ModelSlot:
    """One worker's offer of one model, with the live numbers routing reads."""

    conn: WorkerConnection
    offer: ModelOffer
    client_price: Price  # what a client pays per 1M tokens, fee included
    own_jobs: int = 0  # jobs this coordinator has running on the slot
    # jobs the node runs for the model for its other coordinators (a node may hold sessions
    # with several), as of its last heartbeat: they use the same engine slots
    jobs_elsewhere: int = 0
    engine_running: int = 0
    engine_waiting: int = 0
    kv_cache_usage: float = 0.0
    engine_up: bool = True  # per the last heartbeat (registration proved it up)
    load_reported: bool = False  # a heartbeat has carried the engine's own load numbers

    @property
    def node_id(self) -> str:
        return self.conn.node_id

    @property
    def price_prompt_per_mtok(self) -> int:
        return self.client_price.prompt_per_mtok

    @property
    def price_completion_per_mtok(self) -> int:
        return self.client_price.completion_per_mtok

    @property
    def max_concurrency(self) -> int:
        return self.offer.max_concurrency

    @property
    def in_flight(self) -> int:
        return self.own_jobs + self.jobs_elsewhere

    @property
    def available(self) -> bool:
        conn = self.conn
        return self.engine_up and not conn.draining and not conn.closed and not conn.quarantined

    @property
    def free_slots(self) -> int:
        return max(0, self.offer.max_concurrency - self.in_flight)


@dataclass(eq=False)
class WorkerConnection:
    """One registered worker session. Owned by the gRPC session handler that created it."""

    node_id: str
    advert: Advert
    outbox: asyncio.Queue[pb.CoordinatorMessage | None] = field(default_factory=asyncio.Queue)
    connected_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    jobs: dict[str, asyncio.Queue[pb.JobEvent]] = field(default_factory=dict)
    slots: dict[str, ModelSlot] = field(default_factory=dict)  # per model
    gpus: list[pb.GpuLoad] = field(default_factory=list)
    draining: bool = False  # the worker is shutting down: route nothing new to it
    closed: bool = False
    quarantined: str | None = None  # why the market no longer routes to it (services.trust)
    on_slot_freed: Callable[[], None] | None = None  # called whenever a job ends
    # the worker's signed registration as received, relayed on gossip (verifiable by anyone)
    registration: RelayedRegistration | None = None

    def open_job(self, job: pb.Job) -> asyncio.Queue[pb.JobEvent]:
        events: asyncio.Queue[pb.JobEvent] = asyncio.Queue()
        self.jobs[job.request_id] = events
        self.slots[job.model].own_jobs += 1
        self.outbox.put_nowait(pb.CoordinatorMessage(job=job))
        return events

    def close_job(self, request_id: str, model: str, *, cancel: bool = False) -> None:
        if self.jobs.pop(request_id, None) is None:
            return
        slot = self.slots[model]
        slot.own_jobs = max(0, slot.own_jobs - 1)
        if cancel and not self.closed:
            self.outbox.put_nowait(
                pb.CoordinatorMessage(cancel=pb.CancelJob(request_id=request_id))
            )
        if self.on_slot_freed is not None:
            self.on_slot_freed()

    def deliver(self, event: pb.JobEvent) -> None:
        events = self.jobs.get(event.request_id)
        if events is not None:
            events.put_nowait(event)

    def heartbeat(self, beat: pb.Heartbeat) -> None:
        self.last_seen = time.monotonic()
        for load in beat.loads:
            slot = self.slots.get(load.model)
            if slot is not None:
                slot.engine_up = load.available
                slot.engine_running = load.running
                slot.engine_waiting = load.waiting
                slot.kv_cache_usage = load.kv_cache_usage
                slot.jobs_elsewhere = max(0, load.jobs_elsewhere)
                slot.load_reported = True
        self.gpus = list(beat.gpus)
        if self.on_slot_freed is not None:  # an engine may be back: queued requests look again
            self.on_slot_freed()

    def close(self, reason: str) -> None:
        """The session ended: every job still running on it fails with a retryable error."""
        self.closed = True
        self.outbox.put_nowait(None)  # ends the session's response stream
        for request_id, events in list(self.jobs.items()):
            error = pb.JobError(http_status=502, message=reason, type="worker_lost", retryable=True)
            events.put_nowait(pb.JobEvent(request_id=request_id, error=error))


class Registry:
    def __init__(self, fee_bps: int = 0) -> None:
        self._fee_bps = fee_bps
        self._workers: dict[str, WorkerConnection] = {}
        self._pools: dict[str, list[ModelSlot]] = {}  # model -> slots, cheapest first
        self._freed = asyncio.Event()  # replaced each time it fires
        self.on_join: Callable[[str], None] | None = None  # called with each new session's node
        self.quarantine_of: Callable[[str], str | None] = lambda _node: None

    def quarantine(self, node_id: str, reason: str) -> None:
        """Stop routing to a worker now (its session stays, so its running jobs finish)."""
        conn = self._workers.get(node_id)
        if conn is not None:
            conn.quarantined = reason

    def freed_signal(self) -> asyncio.Event:
        """An event that fires the next time any slot frees up or a worker changes: take it
        before looking for capacity, then wait on it (no wake-up can be missed)."""
        return self._freed

    def notify(self) -> None:
        fired, self._freed = self._freed, asyncio.Event()
        fired.set()

    def add(self, conn: WorkerConnection) -> None:
        """Register a session; a newer session of the same node replaces the older one."""
        old = self._workers.get(conn.node_id)
        if old is not None and old is not conn:
            old.close("replaced by a newer session of the same node")
            self._unpool(old)
        self._workers[conn.node_id] = conn
        conn.on_slot_freed = self.notify
        conn.quarantined = self.quarantine_of(conn.node_id)  # a reconnect does not clear it
        if self.on_join is not None:
            self.on_join(conn.node_id)
        for offer in conn.advert.models:
            price = Price(offer.price_prompt_per_mtok, offer.price_completion_per_mtok)
            slot = ModelSlot(conn, offer, price.with_fee(self._fee_bps))
            conn.slots[offer.name] = slot
            pool = self._pools.setdefault(offer.name, [])
            pool.append(slot)
            pool.sort(key=lambda s: (s.price_completion_per_mtok, s.price_prompt_per_mtok))

    def _unpool(self, conn: WorkerConnection) -> None:
        for name, slot in conn.slots.items():
            pool = self._pools.get(name, [])
            if slot in pool:
                pool.remove(slot)
            if not pool:
                self._pools.pop(name, None)

    def remove(self, conn: WorkerConnection) -> None:
        if self._workers.get(conn.node_id) is conn:
            del self._workers[conn.node_id]
            self._unpool(conn)
            self.notify()

    def get(self, node_id: str) -> WorkerConnection | None:
        return self._workers.get(node_id)

    def all(self) -> list[WorkerConnection]:
        return list(self._workers.values())

    def pool(self, model: str) -> list[ModelSlot]:
        """Every offer of `model` (available or not), cheapest completion price first."""
        return self._pools.get(model, [])

    def models(self) -> dict[str, list[ModelSlot]]:
        return dict(self._pools)

    def expire(self, older_than_s: float) -> list[WorkerConnection]:
        """Close sessions not heard from in `older_than_s` seconds; return them."""
        cutoff = time.monotonic() - older_than_s
        stale = [w for w in self._workers.values() if w.last_seen < cutoff]
        for w in stale:
            w.close("worker stopped sending heartbeats")
            self.remove(w)
        return stale
