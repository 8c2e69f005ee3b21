"""Reputation as a pure function of evidence: a Beta posterior over "this worker's job is
sound", with evidence decaying over time so old good behaviour does not shield new cheating.

A new worker starts at the prior (0.5) on probation; it leaves probation after enough good
outcomes. Proven fraud is not averaged away: it quarantines the worker (see services.trust).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class Outcome(StrEnum):
    SERVED = "served"  # a verified receipt, counts matching the recount
    VERIFIED = "verified"  # a spot check on another worker confirmed the output
    FAILED = "failed"  # the job failed or stalled on the worker's side
    SLOW = "slow"  # it missed the latency objective
    RECEIPT_REJECTED = "receipt_rejected"  # a receipt that does not match the job
    OVERCLAIMED = "overclaimed"  # more tokens claimed than the recount, beyond noise
    FRAUD = "fraud"  # provable cheating (replayed receipt, billed undelivered output …)
    # a prompt sent again at once found nothing in the prefix cache of a worker that sells
    # cached tokens cheaper: it bills cache hits at the full prompt price
    CACHE_HIDDEN = "cache_hidden"


# how much each outcome moves the posterior: (good weight, bad weight)
WEIGHTS: dict[Outcome, tuple[float, float]] = {
    Outcome.SERVED: (1.0, 0.0),
    Outcome.VERIFIED: (3.0, 0.0),
    Outcome.FAILED: (0.0, 1.0),
    Outcome.SLOW: (0.0, 0.3),
    Outcome.RECEIPT_REJECTED: (0.0, 10.0),  # an honest worker never sends one
    Outcome.OVERCLAIMED: (0.0, 10.0),
    Outcome.FRAUD: (0.0, 50.0),
    # billing more than the work, but one miss may be an honest eviction: three quarantine
    Outcome.CACHE_HIDDEN: (0.0, 3.0),
}


@dataclass(frozen=True)
class Evidence:
    outcome: Outcome
    at: float  # seconds (any monotonic clock, the same for all evidence)


@dataclass(frozen=True)
class TrustPolicy:
    prior_good: float = 1.0
    prior_bad: float = 1.0
    half_life_s: float = 7 * 24 * 3600.0  # evidence loses half its weight in a week
    probation_jobs: float = 20.0  # decayed good outcomes needed to leave probation
    probation_share: float = 0.1  # most of a model's traffic all probation workers may take


@dataclass(frozen=True)
class Standing:
    score: float  # posterior mean of soundness, 0..1
    good: float  # decayed good evidence
    bad: float  # decayed bad evidence
    probation: bool

    def as_dict(self) -> dict[str, float | bool]:
        return {"score": round(self.score, 4), "good": round(self.good, 2),
                "bad": round(self.bad, 2), "probation": self.probation}  # fmt: skip


def standing(evidence: Iterable[Evidence], now: float, policy: TrustPolicy) -> Standing:
    good = bad = 0.0
    rate = math.log(2) / policy.half_life_s
    for e in evidence:
        decay = math.exp(-rate * max(0.0, now - e.at))
        plus, minus = WEIGHTS[e.outcome]
        good += plus * decay
        bad += minus * decay
    alpha, beta = policy.prior_good + good, policy.prior_bad + bad
    return Standing(alpha / (alpha + beta), good, bad, good < policy.probation_jobs)


@dataclass(frozen=True)
class Tally:
    """Decayed evidence folded so far: O(1) to update and to read (what routing uses)."""

    good: float = 0.0
    bad: float = 0.0
    at: float = 0.0  # when good/bad were last brought up to date

    def decayed(self, now: float, policy: TrustPolicy) -> Tally:
        factor = math.exp(-math.log(2) / policy.half_life_s * max(0.0, now - self.at))
        return Tally(self.good * factor, self.bad * factor, max(now, self.at))

    def add(self, outcome: Outcome, now: float, policy: TrustPolicy) -> Tally:
        base = self.decayed(now, policy)
        plus, minus = WEIGHTS[outcome]
        return Tally(base.good + plus, base.bad + minus, base.at)

    def standing(self, now: float, policy: TrustPolicy) -> Standing:
        t = self.decayed(now, policy)
        alpha, beta = policy.prior_good + t.good, policy.prior_bad + t.bad
        return Standing(alpha / (alpha + beta), t.good, t.bad, t.good < policy.probation_jobs)
