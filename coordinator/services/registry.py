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
from coordinator.services.request_path.link import JobStream, SessionLink, WorkerLink
from protocol.advert import Advert, ModelOffer
from protocol.market import RelayedRegistration
from protocol.proto import session_pb2 as pb

LOADING_S = 10.0  # an adapter sent a job counts as held until reported, or this long


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
    reaped_orphan_pid: int = 0  # an engine a dead node left, which this one killed at start
    load_reported: bool = False  # a heartbeat has carried the engine's own load numbers
    # LoRA adapters (sha256) loaded in the engine, per the last heartbeat, plus those sent a
    # job since (loading now: the next request for one finds it here, not a cold worker)
    adapters: set[str] = field(default_factory=set)
    adapters_sent: dict[str, float] = field(default_factory=dict)  # adapter -> when, recently
    adapter_price: Price | None = None  # what a client pays with an adapter (None: base price)
    # the engine's prefix cache, as its own counters say (running totals of prompt tokens)
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    ask_note: str = ""  # a node pricing itself by demand: its last decision, and why

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        if not self.prefix_cache_queries:
            return None
        return self.prefix_cache_hits / self.prefix_cache_queries

    @property
    def max_loras(self) -> int:
        return self.offer.max_loras

    @property
    def adapter_price_prompt_per_mtok(self) -> int:
        return (self.adapter_price or self.client_price).prompt_per_mtok

    @property
    def adapter_price_completion_per_mtok(self) -> int:
        return (self.adapter_price or self.client_price).completion_per_mtok

    def worker_price(self, adapter: str = "", batch: bool = False) -> Price:
        """What the worker charges for a job (before the network fee), online or batch."""
        offer = self.offer
        cached = (None if offer.price_cached_prompt_per_mtok is None
                  else offer.cached_price(adapter, batch))  # fmt: skip
        return Price(*offer.prices(adapter, batch), cached)

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
    def price_cached_prompt_per_mtok(self) -> int:
        return self.client_price.cached_per_mtok

    @property
    def max_concurrency(self) -> int:
        return self.offer.max_concurrency

    @property
    def task(self) -> str:
        return self.offer.task

    @property
    def data_retention(self) -> str:
        return self.conn.advert.data_retention

    @property
    def region(self) -> str:
        return self.conn.advert.region

    @property
    def takes_batches(self) -> bool:
        """The node signs batch prices (nodes from before them would sign online ones)."""
        return self.offer.batch_discount_bps is not None

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
    """One registered worker: its advert, its live load, and the link jobs go through."""

    node_id: str
    advert: Advert
    link: WorkerLink = field(default_factory=SessionLink)  # the worker's gRPC session
    connected_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    slots: dict[str, ModelSlot] = field(default_factory=dict)  # per model
    gpus: list[pb.GpuLoad] = field(default_factory=list)
    draining: bool = False  # the worker is shutting down: route nothing new to it
    closed: bool = False
    # the worker's signed registration as received, relayed on gossip (verifiable by anyone)
    registration: RelayedRegistration | None = None
    # set by the registry that holds it: whenever a job ends, and why the market no longer
    # routes to a node (services.trust owns quarantines)
    on_slot_freed: Callable[[], None] = lambda: None
    # (model, adapters before, adapters after) whenever a slot's adapters change
    on_adapters: Callable[[str, set[str], set[str]], None] = lambda _m, _b, _a: None
    quarantine_of: Callable[[str], str | None] = lambda _node: None

    @property
    def quarantined(self) -> str | None:
        return self.quarantine_of(self.node_id)

    def open_job(self, job: pb.Job) -> JobStream:
        """Send a job down the link; the caller reports `job_ended` when it lets go."""
        slot = self.slots[job.model]
        slot.own_jobs += 1
        if job.adapter_sha256:
            if job.adapter_sha256 not in slot.adapters:
                before = set(slot.adapters)
                slot.adapters.add(job.adapter_sha256)
                self.on_adapters(job.model, before, slot.adapters)
            slot.adapters_sent[job.adapter_sha256] = time.monotonic()
        return self.link.open_job(job)

    def job_ended(self, model: str) -> None:
        slot = self.slots.get(model)  # None: the node advertised the model away meanwhile
        if slot is not None:
            slot.own_jobs = max(0, slot.own_jobs - 1)
        self.on_slot_freed()

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
                slot.reaped_orphan_pid = load.reaped_orphan_pid
                slot.load_reported = True
                if slot.offer.max_loras:  # loaded, or sent a job lately and loading still
                    now, reported = time.monotonic(), set(load.adapters)
                    slot.adapters_sent = {
                        a: at for a, at in slot.adapters_sent.items()
                        if a not in reported and now - at < LOADING_S
                    }  # fmt: skip
                    before, slot.adapters = slot.adapters, reported | set(slot.adapters_sent)
                    if before != slot.adapters:
                        self.on_adapters(load.model, before, slot.adapters)
                slot.prefix_cache_queries = load.prefix_cache_queries
                slot.prefix_cache_hits = load.prefix_cache_hits
                slot.ask_note = load.ask_note
        self.gpus = list(beat.gpus)
        self.on_slot_freed()  # an engine may be back: queued requests look again

    def close(self, reason: str) -> None:
        """The session ended: every job still running on it fails with a retryable error."""
        self.closed = True
        self.link.close(reason)


class Registry:
    def __init__(
        self,
        fee_bps: int = 0,
        *,
        quarantine_of: Callable[[str], str | None] = lambda _node: None,
        on_join: Callable[[str], None] = lambda _node: None,
    ) -> None:
        self._fee_bps = fee_bps
        self._workers: dict[str, WorkerConnection] = {}
        self._pools: dict[str, list[ModelSlot]] = {}  # model -> slots, cheapest first
        self._places: dict[str, dict[str, int]] = {}  # model -> node id -> index in its pool
        self._holders: dict[tuple[str, str], set[str]] = {}  # (model, adapter) -> node ids
        self._freed = asyncio.Event()  # replaced each time it fires
        self._quarantine_of = quarantine_of  # why a node may not be routed to (None: it may)
        self._on_join = on_join  # called with each new session's node

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
        conn.on_adapters = lambda model, before, after: self._adapters(
            conn.node_id, model, before, after
        )
        conn.quarantine_of = self._quarantine_of  # a reconnect does not clear a quarantine
        self._on_join(conn.node_id)
        for offer in conn.advert.models:
            slot = ModelSlot(conn, offer, Price(0, 0))
            self._price(slot, offer)
            conn.slots[offer.name] = slot
            self._pools.setdefault(offer.name, []).append(slot)
            self._sort(offer.name)

    def readvertise(
        self, conn: WorkerConnection, advert: Advert, registration: RelayedRegistration
    ) -> None:
        """A live session's newer advert of the same models: new prices and capacity, the
        live load kept. Jobs routed before keep the price they had (their facts hold it)."""
        if conn.closed or self._workers.get(conn.node_id) is not conn:
            return  # a session replaced or expired meanwhile: its adverts count no more
        conn.advert, conn.registration = advert, registration
        for offer in advert.models:
            slot = conn.slots.get(offer.name)
            if slot is not None:
                self._price(slot, offer)
                self._sort(offer.name)
        self.notify()

    def _price(self, slot: ModelSlot, offer: ModelOffer) -> None:
        slot.offer = offer
        price = Price(offer.price_prompt_per_mtok, offer.price_completion_per_mtok,
                      offer.price_cached_prompt_per_mtok)  # fmt: skip
        slot.client_price = price.with_fee(self._fee_bps)
        if offer.max_loras:
            adapter_price = Price(*offer.adapter_prices(), offer.price_cached_prompt_per_mtok)
            slot.adapter_price = adapter_price.with_fee(self._fee_bps)
        else:
            slot.adapter_price = None

    def _sort(self, model: str) -> None:
        pool = self._pools[model]
        pool.sort(key=lambda s: (s.price_completion_per_mtok, s.price_prompt_per_mtok))
        self._places[model] = {s.node_id: i for i, s in enumerate(pool)}

    def _adapters(self, node_id: str, model: str, before: set[str], after: set[str]) -> None:
        for adapter in before - after:
            holders = self._holders.get((model, adapter))
            if holders is not None:
                holders.discard(node_id)
                if not holders:
                    del self._holders[(model, adapter)]
        for adapter in after - before:
            self._holders.setdefault((model, adapter), set()).add(node_id)

    def adapter_holders(self, model: str, adapter: str) -> list[int]:
        """Where the workers holding `adapter` loaded are in `pool(model)` (a lookup, not a
        walk over the pool)."""
        places = self.places(model)
        return [places[n] for n in self._holders.get((model, adapter), ()) if n in places]

    def _unpool(self, conn: WorkerConnection) -> None:
        for name, slot in conn.slots.items():
            self._unpool_slot(conn, name, slot)

    def _unpool_slot(self, conn: WorkerConnection, name: str, slot: ModelSlot) -> None:
        self._adapters(conn.node_id, name, set(slot.adapters), set())
        pool = self._pools.get(name, [])
        if slot in pool:
            pool.remove(slot)
            self._places[name] = {s.node_id: i for i, s in enumerate(pool)}
        if not pool:
            self._pools.pop(name, None)
            self._places.pop(name, None)

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

    def places(self, model: str) -> dict[str, int]:
        """Where each worker's offer of `model` is in `pool(model)` (node id -> index)."""
        return self._places.get(model, {})

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
