"""Reputation as a pure function of evidence (no engine, no database)."""

from __future__ import annotations

import pytest

from coordinator.services.reputation import (
    Evidence,
    Outcome,
    Tally,
    TrustPolicy,
    standing,
)

POLICY = TrustPolicy(half_life_s=100.0, probation_jobs=5.0)


def test_a_new_worker_sits_at_the_prior_on_probation() -> None:
    fresh = standing([], now=0.0, policy=POLICY)
    assert fresh.score == 0.5
    assert fresh.probation


def test_good_work_raises_the_score_and_ends_probation() -> None:
    served = [Evidence(Outcome.SERVED, float(t)) for t in range(6)]
    after = standing(served, now=6.0, policy=POLICY)
    assert after.score > 0.8
    assert not after.probation


def test_old_evidence_fades_by_its_half_life() -> None:
    bad = [Evidence(Outcome.FAILED, 0.0)]
    assert standing(bad, now=0.0, policy=POLICY).bad == pytest.approx(1.0)
    assert standing(bad, now=100.0, policy=POLICY).bad == pytest.approx(0.5)
    assert standing(bad, now=200.0, policy=POLICY).bad == pytest.approx(0.25)


def test_cheating_outweighs_a_long_record() -> None:
    record = [Evidence(Outcome.SERVED, float(t)) for t in range(30)]
    caught = standing([*record, Evidence(Outcome.OVERCLAIMED, 30.0)], now=30.0, policy=POLICY)
    failed = standing([*record, Evidence(Outcome.FAILED, 30.0)], now=30.0, policy=POLICY)
    assert caught.score < failed.score
    assert standing([Evidence(Outcome.RECEIPT_REJECTED, 0.0)] * 2, 0.0, POLICY).score < 0.2


def test_the_running_tally_equals_the_batch_computation() -> None:
    outcomes = [Outcome.SERVED, Outcome.FAILED, Outcome.SLOW, Outcome.SERVED, Outcome.OVERCLAIMED]
    evidence = [Evidence(o, 10.0 * i) for i, o in enumerate(outcomes)]
    tally = Tally(at=0.0)
    for e in evidence:
        tally = tally.add(e.outcome, e.at, POLICY)
    now = 77.0
    assert tally.standing(now, POLICY).score == pytest.approx(standing(evidence, now, POLICY).score)
    assert tally.standing(now, POLICY).good == pytest.approx(standing(evidence, now, POLICY).good)
