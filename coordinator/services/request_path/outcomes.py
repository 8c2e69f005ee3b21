"""What one finished attempt teaches: latency and success into the worker's stats (routing and
its breaker), failure or a missed latency objective into its reputation, latencies into the
metrics."""

from __future__ import annotations

import time

from coordinator.observability import Metrics
from coordinator.services.reputation import Outcome
from coordinator.services.request_path.attempt import Attempt
from coordinator.services.stats import StatsBook
from coordinator.services.trust import Trust, Verdict


class AttemptOutcomes:
    def __init__(
        self, stats: StatsBook, trust: Trust | None, metrics: Metrics | None,
        slo_ttft_s: float, slo_itl_s: float,
    ) -> None:  # fmt: skip
        self._stats = stats
        self._trust = trust
        self._metrics = metrics
        self._slo_ttft_s = slo_ttft_s
        self._slo_itl_s = slo_itl_s

    def missed_slo(self, ttft: float | None, itl: float | None) -> bool:
        return (ttft or 0.0) > self._slo_ttft_s or (itl or 0.0) > self._slo_itl_s

    def finished(self, attempt: Attempt, *, ok: bool) -> None:
        stats = self._stats.get(attempt.node_id, attempt.facts.model)
        now = time.monotonic()
        ttft, itl = attempt.latencies()
        trust, request_id = self._trust, attempt.facts.request_id
        if ok:
            stats.record_latency(ttft, itl)
            stats.record_success(now)
            if trust is not None and self.missed_slo(ttft, itl):
                detail = f"ttft {ttft} s, itl {itl} s"
                trust.observe([Verdict(attempt.node_id, Outcome.SLOW, request_id, detail)])
        else:
            stats.record_failure(now)
            if trust is not None:
                trust.observe([Verdict(attempt.node_id, Outcome.FAILED, request_id)])
        if self._metrics and ok and ttft is not None:
            self._metrics.ttft.labels(attempt.facts.model).observe(ttft)
            if itl is not None:
                self._metrics.itl.labels(attempt.facts.model).observe(itl)
