"""The market at a glance, as plain values: what the operator dashboard, the provider view and
`agora status` show. Live parts (capacity, workers, traffic, routing) are read on the event
loop from memory; the books are read from the database in a thread."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import Any

from coordinator.services.decisions import DecisionLog
from coordinator.services.payouts import Payouts
from coordinator.services.registry import Registry, WorkerConnection
from coordinator.services.stats import StatsBook
from coordinator.services.traffic import TrafficHistory
from coordinator.services.trust import Trust
from coordinator.store import market_store
from coordinator.store.db import Engine

CPU_ONLY = "no GPU (CPU)"
# evidence that says a worker cheated or tried to (what "verification failures" lists)
FAILURES = ("fraud", "receipt_rejected", "overclaimed", "cache_hidden")


def gpu_type(conn: WorkerConnection) -> str:
    hardware = conn.advert.hardware
    return str(hardware.get("gpu_model") or CPU_ONLY)


def worker_status(conn: WorkerConnection) -> str:
    if conn.quarantined:
        return "quarantined"
    if conn.draining:
        return "draining"
    if not any(s.available for s in conn.slots.values()):
        return "unavailable"
    return "serving" if any(s.in_flight for s in conn.slots.values()) else "idle"


def _capacity_row(key: str, name: str, slots: Iterable[Any], workers: int) -> dict[str, Any]:
    up = [s for s in slots if s.available]
    total = sum(s.max_concurrency for s in up)
    in_use = sum(min(s.in_flight, s.max_concurrency) for s in up)
    return {key: name, "workers": workers, "total": total, "in_use": in_use,
            "free": total - in_use}  # fmt: skip


def capacity(registry: Registry) -> dict[str, list[dict[str, Any]]]:
    """Concurrent-request slots (total, in use, free) of routable workers, by model and by
    GPU type."""
    by_model = [
        _capacity_row("model", model, pool, len({s.node_id for s in pool if s.available}))
        for model, pool in sorted(registry.models().items())
    ]
    groups: dict[str, list[WorkerConnection]] = {}
    for conn in registry.all():
        groups.setdefault(gpu_type(conn), []).append(conn)
    by_gpu = []
    for name, conns in sorted(groups.items()):
        slots = [s for c in conns for s in c.slots.values()]
        row = _capacity_row("gpu", name, slots, len(conns))
        row["gpus"] = sum(int(c.advert.hardware.get("gpu_count") or 0) for c in conns)
        by_gpu.append(row)
    return {"by_model": by_model, "by_gpu": by_gpu}


def worker_row(
    conn: WorkerConnection, stats: StatsBook, trust: Trust | None, now: float
) -> dict[str, Any]:
    models = {}
    for name, slot in conn.slots.items():
        measured = stats.get(conn.node_id, name)
        models[name] = {
            "price_prompt_per_mtok": slot.offer.price_prompt_per_mtok,
            "price_completion_per_mtok": slot.offer.price_completion_per_mtok,
            "price_cached_prompt_per_mtok": slot.offer.cached_price(),
            "in_flight": slot.in_flight, "max_concurrency": slot.max_concurrency,
            "ttft_s": measured.ttft_s, "itl_s": measured.itl_s,
            "missed_for_capacity": measured.missed_for_capacity,
            "reaped_orphan_pid": slot.reaped_orphan_pid or None,
            "max_loras": slot.max_loras, "adapters": sorted(slot.adapters),
        }  # fmt: skip
    standing = trust.standing(conn.node_id).as_dict() if trust else None
    return {
        "node_id": conn.node_id,
        "status": worker_status(conn),
        "gpu": gpu_type(conn),
        "models": models,
        "reputation": standing,
        "quarantined": conn.quarantined,
        "last_seen_s": round(now - conn.last_seen, 1),
    }


class Overview:
    def __init__(
        self, registry: Registry, stats: StatsBook, trust: Trust | None, decisions: DecisionLog,
        traffic: TrafficHistory, payouts: Payouts, db: Engine,
    ) -> None:  # fmt: skip
        self._registry = registry
        self._stats = stats
        self._trust = trust
        self._decisions = decisions
        self._traffic = traffic
        self._payouts = payouts
        self._db = db

    def _books(self) -> dict[str, Any]:
        books = market_store.overview(self._db, top=10)
        books["epochs"] = self._payouts.epochs()
        trust = self._trust
        books["verification_failures"] = trust.recent(None, FAILURES, 20) if trust else []
        return books

    async def operator(self) -> dict[str, Any]:
        now = time.monotonic()
        live = {
            "at": time.time(),
            "capacity": capacity(self._registry),
            "workers": [worker_row(c, self._stats, self._trust, now) for c in self._registry.all()],
            "traffic": self._traffic.series(),
            "routing": [r.as_dict() for r in self._decisions.recent(15)],
        }
        return {**live, **await asyncio.to_thread(self._books)}

    def _provider_books(self, node_id: str) -> dict[str, Any]:
        jobs, epochs = market_store.provider_books(self._db, node_id)
        history: list[dict[str, Any]] = []
        if self._trust is not None:
            events = self._trust.recent(node_id, (), 1000)
            history = self._trust.history(node_id, events)
        return {**jobs, "epochs": epochs, "reputation_history": history}

    async def provider(self, node_id: str) -> dict[str, Any]:
        """What one provider may see: its own node only."""
        conn = self._registry.get(node_id)
        live: dict[str, Any] = {
            "node_id": node_id,
            "at": time.time(),
            "connected": conn is not None,
        }
        if conn is not None:
            live["worker"] = worker_row(conn, self._stats, self._trust, time.monotonic())
            live["advert"] = {
                "models": [
                    {"name": m.name, "price_prompt_per_mtok": m.price_prompt_per_mtok,
                     "price_completion_per_mtok": m.price_completion_per_mtok,
                     "max_concurrency": m.max_concurrency, "context_length": m.context_length}
                    for m in conn.advert.models
                ],
                "hardware": dict(conn.advert.hardware),
                "software": dict(conn.advert.software),
            }  # fmt: skip
        if self._trust is not None:
            live["reputation"] = self._trust.standing(node_id).as_dict()
        missed = {}
        for model in self._registry.models():
            measured = self._stats.for_model(model).get(node_id)
            if measured is not None and measured.missed_for_capacity:
                missed[model] = measured.missed_for_capacity
        live["jobs_missed_for_capacity"] = missed
        return {**live, **await asyncio.to_thread(self._provider_books, node_id)}

    def workers(self) -> list[dict[str, Any]]:
        """Every connected worker with its live load and the coordinator's stats of it."""
        now = time.monotonic()
        return [
            {
                "node_id": w.node_id,
                "draining": w.draining,
                "quarantined": w.quarantined,
                "reputation": self._trust.standing(w.node_id).as_dict() if self._trust else None,
                "models": {
                    name: {
                        "available": slot.available,
                        "in_flight": slot.in_flight,
                        "jobs_elsewhere": slot.jobs_elsewhere,  # for the node's other coordinators
                        "reaped_orphan_pid": slot.reaped_orphan_pid or None,
                        "max_concurrency": slot.max_concurrency,
                        "engine_running": slot.engine_running if slot.load_reported else None,
                        "engine_waiting": slot.engine_waiting if slot.load_reported else None,
                        "kv_cache_usage": slot.kv_cache_usage if slot.load_reported else None,
                        "price_prompt_per_mtok": slot.offer.price_prompt_per_mtok,
                        "price_completion_per_mtok": slot.offer.price_completion_per_mtok,
                        # what a prompt token found in its engine's prefix cache costs
                        "price_cached_prompt_per_mtok": slot.offer.cached_price(),
                        # a node pricing itself by demand: its last decision on this ask, and why
                        "ask_note": slot.ask_note,
                        "context_length": slot.offer.context_length,
                        "max_loras": slot.max_loras,  # LoRA adapters loaded on demand, at once
                        "adapters": sorted(slot.adapters),  # loaded now (sha256)
                        # the engine's own prefix-cache counters (prompt tokens), and their ratio
                        "prefix_cache_queries": slot.prefix_cache_queries,
                        "prefix_cache_hits": slot.prefix_cache_hits,
                        "prefix_cache_hit_rate": slot.prefix_cache_hit_rate,
                        "ttft_ewma_s": self._stats.get(w.node_id, name).ttft_s,
                        "itl_ewma_s": self._stats.get(w.node_id, name).itl_s,
                        "failure_rate": self._stats.get(w.node_id, name).failure_rate(),
                        "cooldown_left_s": max(
                            0.0, round(self._stats.get(w.node_id, name).cooldown_until - now, 3)
                        ),
                    }
                    for name, slot in w.slots.items()
                },
                "hardware": dict(w.advert.hardware),
                "software": dict(w.advert.software),
                "gpus": [
                    {
                        "index": g.index,
                        "utilization_pct": g.utilization_pct,
                        "memory_used_mib": g.memory_used_mib,
                        "memory_total_mib": g.memory_total_mib,
                    }
                    for g in w.gpus
                ],
                "seconds_since_seen": round(now - w.last_seen, 3),
                "connected_for_s": round(now - w.connected_at, 3),
            }
            for w in self._registry.all()
        ]

    def routing(self, limit: int) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self._decisions.recent(limit)]

    def trust_events(self, node_id: str | None, outcome: str | None, limit: int) -> dict[str, Any]:
        if self._trust is None:
            return {"events": [], "counts": {}}
        return self._trust.evidence(node_id, outcome, limit)
