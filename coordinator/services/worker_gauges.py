"""Per-worker Prometheus gauges, read from the live registry and stats at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator.services.registry import Registry
from coordinator.services.stats import StatsBook


class WorkerGauges(Collector):
    def __init__(self, registry: Registry, stats: StatsBook) -> None:
        self._registry = registry
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["node", "model"]
        in_flight = GaugeMetricFamily("agora_worker_in_flight", "Jobs running", labels=labels)
        available = GaugeMetricFamily("agora_worker_available", "Routable now", labels=labels)
        waiting = GaugeMetricFamily(
            "agora_worker_engine_waiting", "Requests queued in the engine", labels=labels
        )
        kv = GaugeMetricFamily("agora_worker_kv_cache_usage", "Engine KV cache use", labels=labels)
        ttft = GaugeMetricFamily(
            "agora_worker_ttft_ewma_seconds", "Measured TTFT (EWMA)", labels=labels
        )
        failure = GaugeMetricFamily(
            "agora_worker_failure_rate", "Bayesian failure rate", labels=labels
        )
        score = GaugeMetricFamily(
            "agora_worker_score", "Routing score when last ranked (lower is better)", labels=labels
        )
        workers = GaugeMetricFamily("agora_workers", "Connected workers")
        workers.add_metric([], len(self._registry.all()))
        for model, pool in self._registry.models().items():
            for slot in pool:
                key = [slot.node_id, model]
                in_flight.add_metric(key, slot.in_flight)
                available.add_metric(key, 1.0 if slot.available else 0.0)
                waiting.add_metric(key, slot.engine_waiting)
                kv.add_metric(key, slot.kv_cache_usage)
                stats = self._stats.get(slot.node_id, model)
                if stats.ttft_s is not None:
                    ttft.add_metric(key, stats.ttft_s)
                failure.add_metric(key, stats.failure_rate())
                if stats.last_score is not None:
                    score.add_metric(key, stats.last_score)
        yield from (workers, in_flight, available, waiting, kv, ttft, failure, score)
