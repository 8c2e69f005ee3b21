"""The market simulation: seeded and repeatable, driving the coordinator's own routing, and
telling policies apart on what they are meant to differ in."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from coordinator.services import routing
from coordinator.services.releases.policy import RollbackPolicy
from simulations import policies
from simulations.fleet import make_fleet
from simulations.market import simulate
from simulations.policies import POLICIES
from simulations.release import ReleaseScenario, simulate_release
from simulations.report import gini, metrics, oracle, plot
from simulations.workload import requests

WORKERS, DURATION, RATE = 300, 30.0, 300.0


def run(policy: str, seed: int = 1) -> dict[str, Any]:
    fleet = make_fleet(WORKERS, random.Random(seed), cheater_share=0.05)
    arrivals = list(requests(RATE, DURATION, random.Random(seed + 1)))
    chosen = POLICIES[policy](fleet, random.Random(seed + 2))
    return metrics(simulate(fleet, chosen, arrivals, DURATION, seed + 3))


@pytest.fixture(scope="module")
def results() -> dict[str, dict[str, Any]]:
    return {name: run(name) for name in ("random", "agora", "least-loaded")}


def test_agora_policy_routes_with_the_coordinators_function(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decisions: list[routing.Decision] = []

    def counted(*args: Any, **kwargs: Any) -> routing.Decision:
        decisions.append(routing.route(*args, **kwargs))
        return decisions[-1]

    monkeypatch.setattr(policies, "route", counted)
    fleet = make_fleet(50, random.Random(1))
    agora = POLICIES["agora"](fleet, random.Random(2))
    simulate(fleet, agora, list(requests(20.0, 5.0, random.Random(3))), 5.0, 4)
    assert len(decisions) >= 80  # one per routed request (and per retry)
    assert all(d.sampled <= 16 * 2 for d in decisions)


def test_a_seeded_run_repeats_exactly(results: dict[str, dict[str, Any]]) -> None:
    assert run("agora") == results["agora"]


def test_spot_checks_quarantine_cheaters_and_stop_made_up_output(
    results: dict[str, dict[str, Any]],
) -> None:
    agora, blind = results["agora"], results["random"]
    assert agora["cheaters"] > 0
    assert agora["cheaters_quarantined"] == agora["cheaters"]
    assert blind["cheaters_quarantined"] == 0
    assert agora["bad_output_rate"] < blind["bad_output_rate"] / 5


def test_the_oracle_is_a_lower_bound(results: dict[str, dict[str, Any]]) -> None:
    fleet = make_fleet(WORKERS, random.Random(1), cheater_share=0.05)
    bound = oracle(fleet, list(requests(RATE, DURATION, random.Random(2))), DURATION)
    for row in results.values():
        assert bound["ttft_p50_s"] <= row["ttft_p50_s"]
        assert bound["e2e_p99_s"] <= row["e2e_p99_s"]


def test_full_information_balances_load_better_than_random(
    results: dict[str, dict[str, Any]],
) -> None:
    assert results["least-loaded"]["ttft_p99_s"] < results["random"]["ttft_p99_s"]


def test_gini_and_plots(tmp_path: Path, results: dict[str, dict[str, Any]]) -> None:
    assert gini([1, 1, 1, 1]) == pytest.approx(0.0)
    assert gini([0, 0, 0, 10]) == pytest.approx(0.75)
    [png] = plot(list(results.values()), tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bad_canary_is_rolled_back_in_seconds_and_a_good_one_is_left_alone() -> None:
    """The coordinator's release rules in a 200-provider market: a candidate failing a fifth
    of its jobs at a 5 % canary is rolled back within seconds, failing a fraction of what it
    fails when nothing rolls it back; a candidate as good as the stable version, on providers
    as flaky as the rest, is never rolled back by the error rule in five seeded markets."""
    arrivals = list(requests(150, 30, random.Random(2)))
    scenario = ReleaseScenario(candidate_fail_rate=0.2, candidate_fleet_share=0.25)
    runs = {
        rollback: simulate_release(
            make_fleet(200, random.Random(1)), arrivals, 30, scenario, rollback=rollback, seed=3
        )
        for rollback in (True, False)
    }
    rolled, baseline = runs[True], runs[False]
    assert rolled.rolled_back_at_s is not None
    assert rolled.rolled_back_at_s < 10
    assert rolled.reason is not None
    assert rolled.reason.startswith("error rate")
    assert baseline.rolled_back_at_s is None
    assert rolled.candidate_failures * 3 < baseline.candidate_failures
    assert rolled.client_errors <= baseline.client_errors  # the stable version took them
    errors_only = RollbackPolicy(latency_min_requests=10**9)
    good = ReleaseScenario(candidate_fail_rate=0.0, candidate_fleet_share=0.25,
                           rollback=errors_only)  # fmt: skip
    for seed in range(5):
        run = simulate_release(make_fleet(200, random.Random(seed)), arrivals, 30, good,
                               rollback=True, seed=seed)  # fmt: skip
        assert run.rolled_back_at_s is None, run.reason


def test_with_conversations_the_cache_term_keeps_turns_on_their_prefix() -> None:
    """Multi-turn chats: Agora's routing with its prefix-cache term finds far more of each
    prompt in the serving engine's cache, and answers sooner, than the same routing without."""
    out = {}
    for policy in ("agora", "agora-no-cache"):
        fleet = make_fleet(WORKERS, random.Random(1), cheater_share=0.0)
        arrivals = list(requests(RATE, DURATION, random.Random(2), conversations=True))
        assert sum(r.shared_tokens > 0 for r in arrivals) > len(arrivals) * 0.3  # next turns
        chosen = POLICIES[policy](fleet, random.Random(3))
        out[policy] = metrics(simulate(fleet, chosen, arrivals, DURATION, 4))
    aware, blind = out["agora"], out["agora-no-cache"]
    assert aware["cached_prompt_share"] > 5 * max(blind["cached_prompt_share"], 0.005)
    assert aware["ttft_p50_s"] < blind["ttft_p50_s"]
