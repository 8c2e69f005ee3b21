"""Prometheus metrics (one registry per coordinator, no process globals) and JSON logs that
carry the request id every response also returns."""

from __future__ import annotations

import contextvars
import logging
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from pythonjsonlogger.json import JsonFormatter


@dataclass(frozen=True)
class Totals:
    """Cumulative counters at one moment."""

    requests: float
    errors: float
    prompt_tokens: float
    completion_tokens: float
    ttft_bounds: tuple[float, ...]  # histogram upper bounds (the last is +inf)
    ttft_counts: tuple[float, ...]  # cumulative count per bound


request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class Metrics:
    """`multiprocess_dir`: set for a process of `--processes N` (prometheus_client's
    multiprocess mode, switched on for the whole process by PROMETHEUS_MULTIPROC_DIR before it
    starts): what it exposes, and the dashboard's traffic, sum every process's counters."""

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self._multiprocess_dir = multiprocess_dir
        self._watched: list[Collector] = []
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
        self.release_requests = Counter(
            "agora_release_requests", "Requests per model version (shadow copies apart)",
            ["model", "version", "outcome"], registry=r,
        )  # fmt: skip
        self.response_cache = Counter(
            "agora_response_cache", "Requests that asked for the response cache, by result",
            ["model", "result"], registry=r,
        )  # fmt: skip
        self.policy_actions = Counter(
            "agora_policy_actions", "What policy steps did (kinds and counts, never values)",
            ["policy", "step", "entity", "action"], registry=r,
        )  # fmt: skip
        self.rollbacks = Counter(
            "agora_release_rollbacks", "Versions rolled back (automatically or by an operator)",
            ["model", "version", "trigger"], registry=r,
        )  # fmt: skip

    def totals(self) -> Totals:
        """The cumulative counters the dashboard's traffic history is made of."""
        requests = errors = prompt = completion = 0.0
        bounds: dict[float, float] = {}
        for family in self.exposed().collect():
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

    def watch(self, collector: Collector) -> None:
        """Gauges read from live state at scrape time (e.g. services.worker_gauges)."""
        self.registry.register(collector)
        self._watched.append(collector)

    def exposed(self) -> CollectorRegistry:
        """What /metrics shows: this registry, or all processes' counters summed plus this
        process's live gauges."""
        if self._multiprocess_dir is None:
            return self.registry
        merged = CollectorRegistry()
        MultiProcessCollector(merged, str(self._multiprocess_dir))  # type: ignore[no-untyped-call]
        for collector in self._watched:
            merged.register(collector)
        return merged


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
