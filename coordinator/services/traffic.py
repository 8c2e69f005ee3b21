"""Traffic over time for the dashboard: a ring of fixed-interval points, each the difference
between two readings of the coordinator's cumulative counters (the Prometheus ones, so the
dashboard and /metrics never disagree)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from coordinator.observability import Totals


@dataclass(frozen=True)
class Point:
    t: float  # unix seconds at the end of the interval
    requests_per_s: float
    tokens_per_s: float  # completion tokens
    error_rate: float  # errors / requests in the interval
    ttft_p50_s: float | None
    ttft_p99_s: float | None


def quantile(bounds: Sequence[float], cumulative: Sequence[float], q: float) -> float | None:
    """The histogram bucket bound below which a share q of samples fall (None when empty)."""
    total = cumulative[-1] if cumulative else 0.0
    if total <= 0:
        return None
    for bound, count in zip(bounds, cumulative, strict=True):
        if count >= q * total:
            return bound if bound != float("inf") else bounds[-2]
    return bounds[-2]


def point_between(before: Totals, after: Totals, t: float, seconds: float) -> Point:
    requests = after.requests - before.requests
    errors = after.errors - before.errors
    counts = [a - b for a, b in zip(after.ttft_counts, before.ttft_counts, strict=True)]
    return Point(
        t=t,
        requests_per_s=requests / seconds,
        tokens_per_s=(after.completion_tokens - before.completion_tokens) / seconds,
        error_rate=errors / requests if requests else 0.0,
        ttft_p50_s=quantile(after.ttft_bounds, counts, 0.5),
        ttft_p99_s=quantile(after.ttft_bounds, counts, 0.99),
    )


class TrafficHistory:
    def __init__(self, interval_s: float = 5.0, points: int = 720) -> None:
        self.interval_s = interval_s
        self._points: deque[Point] = deque(maxlen=points)  # an hour at 5 s
        self._last: tuple[float, Totals] | None = None

    def sample(self, now: float, totals: Totals) -> None:
        if self._last is not None and now > self._last[0]:
            before_t, before = self._last
            self._points.append(point_between(before, totals, now, now - before_t))
        self._last = (now, totals)

    def series(self) -> list[dict[str, float | None]]:
        return [asdict(p) for p in self._points]
