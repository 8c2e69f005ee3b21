"""The demand-shift simulation (issue 21's benchmark) on a small fleet: every mode serves the
same seeded workload; nodes that change model cut the requests turned away, and price
discovery cuts the providers left idle and what clients pay, against fixed configs."""

from __future__ import annotations

from typing import Any

import pytest

from simulations.demand_shift import MODES, simulate_demand


@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, Any]]:
    return {mode: simulate_demand(300, mode, 1800, 0.7, seed=3) for mode in MODES}


def test_every_mode_plays_the_same_workload(runs: dict[str, dict[str, Any]]) -> None:
    assert len({r["requests"] for r in runs.values()}) == 1
    assert runs["fixed"]["model_switches"] == 0
    assert runs["scaling"]["model_switches"] > 0
    assert runs["scaling-fixed-price"]["model_switches"] > 0


def test_nodes_that_follow_demand_turn_fewer_requests_away(
    runs: dict[str, dict[str, Any]],
) -> None:
    assert runs["scaling-fixed-price"]["unmet_share"] < 0.8 * runs["fixed"]["unmet_share"]
    assert runs["scaling"]["unmet_share"] < runs["fixed"]["unmet_share"]


def test_price_discovery_leaves_fewer_providers_idle_and_costs_clients_less(
    runs: dict[str, dict[str, Any]],
) -> None:
    assert runs["price"]["idle_provider_share"] < runs["fixed"]["idle_provider_share"]
    assert runs["price"]["client_price_mean"] < runs["fixed"]["client_price_mean"]
