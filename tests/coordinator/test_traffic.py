"""Traffic history and browser sessions: pure parts of the dashboards."""

from __future__ import annotations

import math

from coordinator.api.browser_sessions import BrowserSessions
from coordinator.observability import Totals
from coordinator.services.traffic import TrafficHistory, quantile

BOUNDS = (0.05, 0.1, 0.5, 1.0, math.inf)


def totals(requests: float, errors: float, tokens: float, ttft: tuple[float, ...]) -> Totals:
    return Totals(requests, errors, 0.0, tokens, BOUNDS, ttft)


def test_each_point_is_the_rate_between_two_readings() -> None:
    history = TrafficHistory(interval_s=5)
    history.sample(100.0, totals(10, 0, 1000, (5, 8, 10, 10, 10)))
    history.sample(105.0, totals(20, 2, 1500, (5, 8, 18, 19, 20)))  # 10 more: 8 in (0.1, 0.5]
    [point] = history.series()
    assert point["requests_per_s"] == 2.0
    assert point["tokens_per_s"] == 100.0
    assert point["error_rate"] == 0.2
    assert point["ttft_p50_s"] == 0.5
    assert point["ttft_p99_s"] == 1.0  # the +inf bucket reports the last finite bound


def test_an_idle_interval_has_no_latency_quantiles() -> None:
    assert quantile(BOUNDS, (0, 0, 0, 0, 0), 0.5) is None
    history = TrafficHistory()
    history.sample(1.0, totals(3, 0, 10, (1, 2, 3, 3, 3)))
    history.sample(2.0, totals(3, 0, 10, (1, 2, 3, 3, 3)))
    assert history.series()[0]["ttft_p50_s"] is None
    assert history.series()[0]["error_rate"] == 0.0


def test_sessions_challenges_and_links_expire_and_work_once() -> None:
    now = [1000.0]
    sessions = BrowserSessions(ttl_s=60, challenge_ttl_s=10, clock=lambda: now[0])
    token = sessions.open("operator")
    assert sessions.get(token) is not None
    challenge = sessions.challenge()
    assert sessions.take_challenge(challenge)
    assert not sessions.take_challenge(challenge)  # once
    link = sessions.link("node-a")
    assert sessions.redeem(link) == "node-a"
    assert sessions.redeem(link) is None  # once
    late = sessions.link("node-a")
    stale = sessions.challenge()
    now[0] += 61
    assert sessions.get(token) is None
    assert sessions.redeem(late) is None
    assert not sessions.take_challenge(stale)
    assert sessions.get("made-up") is None
