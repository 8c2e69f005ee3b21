"""What the coordinator measures about each worker serving each model: EWMA latencies, a
decayed success/failure record, and a circuit breaker that cools a failing worker down."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class BreakerPolicy:
    alpha: float = 0.2  # EWMA weight of a new latency sample that is no worse than the mean
    alpha_worse: float = 0.5  # weight of a worse sample: react fast to a worker turning slow
    half_life_s: float = 600.0  # success/failure counts halve over this time
    cooldown_s: float = 5.0  # first cooldown after a failure; doubles per consecutive failure
    max_cooldown_s: float = 120.0  # cooldown ceiling


def _ewma(previous: float | None, sample: float, policy: BreakerPolicy) -> float:
    if previous is None:
        return sample
    alpha = policy.alpha_worse if sample > previous else policy.alpha
    return alpha * sample + (1 - alpha) * previous


@dataclass
class WorkerStats:
    policy: BreakerPolicy = field(default_factory=BreakerPolicy)
    ttft_s: float | None = None
    itl_s: float | None = None
    successes: float = 0.0  # decayed counts
    failures: float = 0.0
    consecutive_failures: int = 0
    cooldown_until: float = 0.0
    updated_at: float = 0.0
    last_score: float | None = None  # its routing score the last time it was ranked
    missed_for_capacity: int = 0  # requests it was considered for while it had no free slot

    def _decay(self, now: float) -> None:
        if self.updated_at:
            factor = math.exp2(-(now - self.updated_at) / self.policy.half_life_s)
            self.successes *= factor
            self.failures *= factor
        self.updated_at = now

    def record_latency(self, ttft_s: float | None, itl_s: float | None) -> None:
        if ttft_s is not None:
            self.ttft_s = _ewma(self.ttft_s, ttft_s, self.policy)
        if itl_s is not None:
            self.itl_s = _ewma(self.itl_s, itl_s, self.policy)

    def record_success(self, now: float) -> None:
        self._decay(now)
        self.successes += 1
        self.consecutive_failures = 0

    def record_failure(self, now: float) -> None:
        """Count a failure and open the breaker for an exponentially growing cooldown."""
        self._decay(now)
        self.failures += 1
        self.consecutive_failures += 1
        cooldown = self.policy.cooldown_s * 2 ** (self.consecutive_failures - 1)
        self.cooldown_until = now + min(self.policy.max_cooldown_s, cooldown)

    def failure_rate(self) -> float:
        """Posterior mean of the failure probability under a Beta(1, 4) prior."""
        return (self.failures + 1) / (self.successes + self.failures + 5)


class StatsBook:
    """Stats per (worker, model), created on first use."""

    def __init__(self, policy: BreakerPolicy | None = None) -> None:
        self._policy = policy or BreakerPolicy()
        self._by_model: dict[str, dict[str, WorkerStats]] = {}

    def for_model(self, model: str) -> dict[str, WorkerStats]:
        return self._by_model.setdefault(model, {})

    def reset_breaker(self, node_id: str) -> None:
        """A node that comes back in a new session (restarted) gets a closed breaker; its
        failure record stays in its failure rate."""
        for book in self._by_model.values():
            stats = book.get(node_id)
            if stats is not None:
                stats.cooldown_until = 0.0
                stats.consecutive_failures = 0

    def get(self, node_id: str, model: str) -> WorkerStats:
        book = self.for_model(model)
        stats = book.get(node_id)
        if stats is None:
            stats = book[node_id] = WorkerStats(self._policy)
        return stats
