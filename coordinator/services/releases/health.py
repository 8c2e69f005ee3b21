"""How each version is doing over a sliding window, and the rule that rolls a candidate back
when it does clearly worse than the stable version."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from coordinator.services.releases.policy import RollbackPolicy


@dataclass(frozen=True)
class WindowStats:
    requests: int = 0
    failed: int = 0  # client errors, failed attempts and failed spot checks
    ttft_p50_s: float | None = None
    ttft_p95_s: float | None = None

    @property
    def error_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "requests": self.requests, "failed": self.failed,
            "error_rate": round(self.error_rate, 4),
            "ttft_p50_ms": None if self.ttft_p50_s is None else round(self.ttft_p50_s * 1e3, 1),
            "ttft_p95_ms": None if self.ttft_p95_s is None else round(self.ttft_p95_s * 1e3, 1),
        }  # fmt: skip


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Window:
    """Outcomes of one version's requests over the last `span_s` seconds."""

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self._samples: deque[tuple[float, bool, float | None]] = deque()

    def add(self, at: float, failed: bool, ttft_s: float | None) -> None:
        self._samples.append((at, failed, ttft_s))

    def stats(self, now: float) -> WindowStats:
        samples = self._samples
        while samples and samples[0][0] < now - self.span_s:
            samples.popleft()
        ttfts = sorted(t for _, failed, t in samples if t is not None and not failed)
        return WindowStats(
            requests=len(samples),
            failed=sum(1 for _, failed, _ in samples if failed),
            ttft_p50_s=_quantile(ttfts, 0.5),
            ttft_p95_s=_quantile(ttfts, 0.95),
        )

    def clear(self) -> None:
        self._samples.clear()


def upper_tail(failed: int, requests: int, rate: float) -> float:
    """P(at least `failed` failures in `requests`) at a true failure `rate` (exact binomial,
    summed from `failed` up until the terms stop counting)."""
    if failed <= 0:
        return 1.0
    if rate <= 0.0:
        return 0.0
    if rate >= 1.0 or failed <= requests * rate:
        return 1.0  # no fewer than expected: nothing to see
    n, log_p, log_q = requests, math.log(rate), math.log1p(-rate)
    total = 0.0
    for k in range(failed, n + 1):
        term = math.exp(
            math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
            + k * log_p + (n - k) * log_q
        )  # fmt: skip
        total += term
        if term < total * 1e-12:
            break
    return min(1.0, total)


def rollback_reason(
    candidate: WindowStats, stable: WindowStats, policy: RollbackPolicy
) -> str | None:
    """Why a candidate must be rolled back, or None. Its error rate must pass the threshold
    and be `error_ratio` times the stable's, and be so with confidence: the lower end of its
    Wilson interval must be above both the threshold and the stable's rate (the rule runs
    after every request; without this a good candidate on a few flaky providers is rolled
    back by chance: 3 failures in 20 happen 6 % of the time at a 4.5 % base rate). Its TTFT
    p95 compares only once the stable version has a full sample too (a cold stable window
    accuses nobody of being slow)."""
    if candidate.requests < policy.min_requests:
        return None
    rate, stable_rate = candidate.error_rate, stable.error_rate
    chance = upper_tail(candidate.failed, candidate.requests, max(policy.error_rate, stable_rate))
    if (
        rate > policy.error_rate
        and rate >= policy.error_ratio * stable_rate
        and chance < policy.alpha
    ):
        return (
            f"error rate {rate:.1%} over {candidate.requests} requests "
            f"(stable {stable_rate:.1%}; threshold {policy.error_rate:.1%} and "
            f"{policy.error_ratio:g}x stable)"
        )
    p95, stable_p95 = candidate.ttft_p95_s, stable.ttft_p95_s
    enough = min(candidate.requests, stable.requests) >= policy.latency_min_requests
    if (
        p95 is not None
        and stable_p95 is not None
        and enough
        and p95 > policy.ttft_ratio * stable_p95
    ):
        return (
            f"TTFT p95 {p95 * 1e3:.0f} ms over {candidate.requests} requests "
            f"(stable {stable_p95 * 1e3:.0f} ms; threshold {policy.ttft_ratio:g}x stable)"
        )
    return None
