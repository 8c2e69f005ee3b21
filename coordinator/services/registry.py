"""Live worker sessions: who is connected, what they offer, what they are running."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from protocol.advert import Advert, ModelOffer
from protocol.proto import session_pb2 as pb


@dataclass
class WorkerConnection:
    """One registered worker session. Owned by the gRPC session handler that created it."""

    node_id: str
    advert: Advert
    outbox: asyncio.Queue[pb.CoordinatorMessage | None] = field(
        default_factory=asyncio.Queue
    )  # None ends the session
    connected_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    jobs: dict[str, asyncio.Queue[pb.JobEvent]] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)  # per model
    loads: dict[str, pb.ModelLoad] = field(default_factory=dict)  # last heartbeat, per model
    gpus: list[pb.GpuLoad] = field(default_factory=list)
    draining: bool = False  # the worker is shutting down: route nothing new to it
    closed: bool = False

    def offer(self, model: str) -> ModelOffer | None:
        return self.advert.offer(model)

    def available(self, model: str) -> bool:
        """Routable for `model`: offered, engine up (per the last heartbeat), not leaving."""
        load = self.loads.get(model)
        engine_up = load is None or load.available  # no heartbeat yet: registration just proved it
        return not (self.closed or self.draining) and engine_up and self.offer(model) is not None

    def heartbeat(self, beat: pb.Heartbeat) -> None:
        self.last_seen = time.monotonic()
        for load in beat.loads:
            self.loads[load.model] = load
        self.gpus = list(beat.gpus)

    def free_slots(self, model: str) -> int:
        offer = self.offer(model)
        return offer.max_concurrency - self.in_flight.get(model, 0) if offer else 0

    def open_job(self, job: pb.Job) -> asyncio.Queue[pb.JobEvent]:
        events: asyncio.Queue[pb.JobEvent] = asyncio.Queue()
        self.jobs[job.request_id] = events
        self.in_flight[job.model] = self.in_flight.get(job.model, 0) + 1
        self.outbox.put_nowait(pb.CoordinatorMessage(job=job))
        return events

    def close_job(self, request_id: str, model: str, *, cancel: bool = False) -> None:
        if self.jobs.pop(request_id, None) is None:
            return
        self.in_flight[model] = max(0, self.in_flight.get(model, 0) - 1)
        if cancel and not self.closed:
            self.outbox.put_nowait(
                pb.CoordinatorMessage(cancel=pb.CancelJob(request_id=request_id))
            )

    def deliver(self, event: pb.JobEvent) -> None:
        self.last_seen = time.monotonic()
        events = self.jobs.get(event.request_id)
        if events is not None:
            events.put_nowait(event)

    def close(self, reason: str) -> None:
        """The session ended: every job still running on it fails (retryable if nothing was
        relayed yet; the gateway knows)."""
        self.closed = True
        self.outbox.put_nowait(None)  # ends the session's response stream
        for request_id, events in list(self.jobs.items()):
            error = pb.JobError(http_status=502, message=reason, type="worker_lost", retryable=True)
            events.put_nowait(pb.JobEvent(request_id=request_id, error=error))


class Registry:
    def __init__(self) -> None:
        self._workers: dict[str, WorkerConnection] = {}

    def add(self, conn: WorkerConnection) -> None:
        """Register a session; a newer session of the same node replaces the older one."""
        old = self._workers.get(conn.node_id)
        if old is not None and old is not conn:
            old.close("replaced by a newer session of the same node")
        self._workers[conn.node_id] = conn

    def remove(self, conn: WorkerConnection) -> None:
        if self._workers.get(conn.node_id) is conn:
            del self._workers[conn.node_id]

    def get(self, node_id: str) -> WorkerConnection | None:
        return self._workers.get(node_id)

    def all(self) -> list[WorkerConnection]:
        return list(self._workers.values())

    def serving(self, model: str) -> list[WorkerConnection]:
        """Workers that can take a `model` job now."""
        return [w for w in self._workers.values() if w.available(model)]

    def advertised(self, model: str) -> list[WorkerConnection]:
        """Workers that offer `model`, available or not (down engine, draining)."""
        return [w for w in self._workers.values() if not w.closed and w.offer(model)]

    def models(self) -> dict[str, list[WorkerConnection]]:
        """Every advertised model and the workers offering it."""
        out: dict[str, list[WorkerConnection]] = {}
        for w in self._workers.values():
            if w.closed:
                continue
            for offer in w.advert.models:
                out.setdefault(offer.name, []).append(w)
        return out

    def expire(self, older_than_s: float) -> list[WorkerConnection]:
        """Close sessions not heard from in `older_than_s` seconds; return them."""
        cutoff = time.monotonic() - older_than_s
        stale = [w for w in self._workers.values() if w.last_seen < cutoff]
        for w in stale:
            w.close("worker stopped sending heartbeats")
            self.remove(w)
        return stale
