"""Prometheus metrics (one registry per coordinator, no process globals) and JSON logs that
carry the request id every response also returns."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from pythonjsonlogger.json import JsonFormatter

from coordinator.services.registry import Registry
from coordinator.services.stats import StatsBook
from coordinator.services.traffic import Totals

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "agora_requests", "Completed requests", ["model", "endpoint", "status"], registry=r
        )
        self.ttft = Histogram(
            "agora_ttft_seconds", "Time to first token", ["model"], buckets=_LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.itl = Histogram(
            "agora_inter_token_latency_seconds", "Mean time between tokens of a request",
            ["model"], buckets=_ITL_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter("agora_tokens", "Tokens billed", ["model", "kind"], registry=r)
        self.routing = Counter(
            "agora_routing_decisions", "Routing decisions", ["model", "sort", "outcome"],
            registry=r,
        )  # fmt: skip
        self.failovers = Counter(
            "agora_failovers", "Attempts moved to another worker before the first token",
            ["model"], registry=r,
        )  # fmt: skip
        self.continuations = Counter(
            "agora_continuations", "Streams continued on another worker mid-generation",
            ["model", "outcome"], registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            "agora_rate_limited", "Requests refused by per-key limits", registry=r
        )

    def totals(self) -> Totals:
        """The cumulative counters the dashboard's traffic history is made of."""
        requests = errors = prompt = completion = 0.0
        bounds: dict[float, float] = {}
        for family in self.registry.collect():
            for s in family.samples:
                if s.name == "agora_requests_total":
                    requests += s.value
                    errors += s.value if s.labels.get("status") != "ok" else 0.0
                elif s.name == "agora_tokens_total":
                    if s.labels.get("kind") == "prompt":
                        prompt += s.value
                    else:
                        completion += s.value
                elif s.name == "agora_ttft_seconds_bucket":
                    bound = float(s.labels["le"])
                    bounds[bound] = bounds.get(bound, 0.0) + s.value
        ordered = sorted(bounds) or [*_LATENCY_BUCKETS, float("inf")]
        counts = tuple(bounds.get(b, 0.0) for b in ordered)
        return Totals(requests, errors, prompt, completion, tuple(ordered), counts)

    def watch(self, registry: Registry, stats: StatsBook) -> None:
        """Per-worker gauges, read from the live registry at scrape time."""
        self.registry.register(_WorkerCollector(registry, stats))


class _WorkerCollector(Collector):
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


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def configure_logging(level: str, fmt: str) -> None:
    """Root logging: JSON lines (default) or plain text, each record with its request id."""
    handler = logging.StreamHandler()
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                "{asctime}{levelname}{name}{message}{request_id}",
                style="{",
                rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
