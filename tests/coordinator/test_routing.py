"""Routing is a pure function: these tests feed it plain values."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest

from coordinator.services.probation import ProbationShare
from coordinator.services.routing import (
    Decision,
    Preferences,
    RouteRequest,
    RoutingPolicy,
    StatsView,
    route,
)
from coordinator.services.stats import WorkerStats

REQUEST = RouteRequest("m", prompt_tokens=100, max_tokens=100)


@dataclass
class Offer:
    node_id: str
    price_prompt_per_mtok: int
    price_completion_per_mtok: int
    in_flight: int = 0
    max_concurrency: int = 4
    engine_waiting: int = 0
    kv_cache_usage: float = 0.0
    available: bool = True
    adapters: frozenset[str] = frozenset()  # LoRA adapters loaded
    max_loras: int = 0
    adapter_price_prompt_per_mtok: int = 0
    adapter_price_completion_per_mtok: int = 0
    cached_price: int | None = None  # None: a cached prompt token costs the prompt price
    task: str = "generate"
    takes_batches: bool = True
    data_retention: str = ""  # declared in the advert
    region: str = ""

    @property
    def price_cached_prompt_per_mtok(self) -> int:
        return self.price_prompt_per_mtok if self.cached_price is None else self.cached_price


def pool(*offers: Offer) -> list[Offer]:
    return sorted(offers, key=lambda o: (o.price_completion_per_mtok, o.price_prompt_per_mtok))


CHEAP, MID, DEAR = (
    Offer("node-cheap", 100, 200),
    Offer("node-mid", 150, 300),
    Offer("node-dear", 300, 600),
)


def decide(
    candidates: list[Offer],
    prefs: Preferences = Preferences(),
    stats: Mapping[str, StatsView] | None = None,
    **kw: Any,
) -> Decision:
    return route(REQUEST, candidates, stats or {}, prefs, random.Random(0), now=1000.0,
                 price_sorted=True, **kw)  # fmt: skip


def test_sort_by_price_picks_the_cheapest() -> None:
    decision = decide(pool(DEAR, CHEAP, MID), Preferences(sort="price"))
    assert [s.node_id for s in decision.ranked] == ["node-cheap", "node-mid", "node-dear"]
    assert decision.sort == "price"


def test_max_price_excludes_and_says_why() -> None:
    decision = decide(pool(CHEAP, MID, DEAR), Preferences(max_price_completion=300))
    assert {s.node_id for s in decision.ranked} == {"node-cheap", "node-mid"}
    assert decision.excluded == {"over_max_price": 1}
    nothing = decide(pool(CHEAP, MID), Preferences(max_price_completion=100))
    assert nothing.ranked == ()
    assert nothing.excluded == {"over_max_price": 2}
    by_prompt = decide(pool(CHEAP, MID), Preferences(max_price_prompt=120))
    assert [s.node_id for s in by_prompt.ranked] == ["node-cheap"]


def test_asks_below_the_operators_reserve_are_not_routed() -> None:
    reserved = dataclasses.replace(REQUEST, reserve=(0, 300))  # client prices, fee included
    decision = route(reserved, pool(CHEAP, MID, DEAR), {}, Preferences(), random.Random(0),
                     now=1000.0, price_sorted=True)  # fmt: skip
    assert {s.node_id for s in decision.ranked} == {"node-mid", "node-dear"}
    assert decision.excluded == {"below_reserve": 1}


def test_ignore_and_order_are_obeyed() -> None:
    ignored = decide(
        pool(CHEAP, MID, DEAR), Preferences(sort="price", ignore=frozenset({"node-cheap"}))
    )
    assert ignored.ranked[0].node_id == "node-mid"
    assert "node-cheap" not in [s.node_id for s in ignored.ranked]
    ordered = decide(pool(CHEAP, MID, DEAR), Preferences(order=("node-dear",)))
    assert ordered.ranked[0].node_id == "node-dear"
    assert len(ordered.ranked) == 3  # fallbacks follow
    strict = decide(
        pool(CHEAP, MID, DEAR), Preferences(order=("node-dear",), allow_fallbacks=False)
    )
    assert [s.node_id for s in strict.ranked] == ["node-dear"]


def test_names_match_by_suffix_of_at_least_six_characters() -> None:
    decision = decide(pool(CHEAP, MID), Preferences(order=("e-mid",)))
    assert decision.ranked[0].node_id == "node-cheap"  # too short to match: plain ranking
    decision = decide(pool(CHEAP, MID), Preferences(order=("de-mid",)))
    assert decision.ranked[0].node_id == "node-mid"


def test_full_unavailable_and_cooling_workers_are_not_ranked() -> None:
    full = Offer("node-full", 1, 1, in_flight=4)
    down = Offer("node-down", 1, 1, available=False)
    cooling = Offer("node-cool", 1, 1)
    stats = {"node-cool": WorkerStats(cooldown_until=2000.0)}
    decision = decide(pool(full, down, cooling, MID), stats=stats)
    assert [s.node_id for s in decision.ranked] == ["node-mid"]
    assert decision.excluded == {"at_capacity": 1, "unavailable": 1, "cooling_down": 1}


def test_default_routing_prefers_a_fast_worker_over_a_slightly_cheaper_slow_one() -> None:
    slow, fast = WorkerStats(ttft_s=1.5), WorkerStats(ttft_s=0.1)
    decision = decide(pool(CHEAP, MID), stats={"node-cheap": slow, "node-mid": fast})
    assert decision.ranked[0].node_id == "node-mid"
    chosen = decision.ranked[0]
    assert chosen.terms["ttft"] == pytest.approx(0.1)
    assert chosen.terms["price"] == pytest.approx(0.5)  # 50 % dearer than the cheapest


def test_load_and_failures_push_a_worker_down() -> None:
    busy = Offer("node-busy", 100, 200, in_flight=3, engine_waiting=4)
    idle = Offer("node-idle", 100, 200)
    assert decide(pool(busy, idle)).ranked[0].node_id == "node-idle"
    flaky = WorkerStats(successes=1, failures=6)
    steady = WorkerStats(successes=20, failures=0)
    decision = decide(pool(Offer("node-a", 100, 200), Offer("node-b", 100, 200)),
                      stats={"node-a": flaky, "node-b": steady})  # fmt: skip
    assert decision.ranked[0].node_id == "node-b"


def test_explanation_names_the_chosen_worker_and_its_terms() -> None:
    decision = decide(pool(CHEAP, MID, DEAR), Preferences(sort="price"))
    header = decision.explain()
    assert header.startswith("sort=price;considered=3;sampled=3;excluded=0;ranked=")
    assert header.index("de-cheap") < header.index("node-mid")
    assert decision.ranked[0].node_id == "node-cheap"
    assert decision.as_dict()["sampled"] == 3


def test_large_pools_are_sampled_not_scanned() -> None:
    big = pool(*(Offer(f"node-{i:05d}", 100 + i % 7, 200 + i % 11) for i in range(10_000)))
    policy = RoutingPolicy(sample_size=8)
    decision = decide(big, policy=policy)
    assert decision.considered == 10_000
    assert decision.sampled <= 8 * 4
    assert len(decision.ranked) == policy.ranked_size
    cheapest = decide(big, Preferences(sort="price"), policy=policy)
    assert cheapest.sampled == 8  # the pool is sorted by price: the first eight are the cheapest
    assert cheapest.ranked[0].terms["price"] == 0.0


def test_sampling_is_seeded_by_the_callers_rng() -> None:
    big = pool(*(Offer(f"node-{i:05d}", 100, 200) for i in range(1000)))
    a = route(REQUEST, big, {}, Preferences(), random.Random(7), 0.0)
    b = route(REQUEST, big, {}, Preferences(), random.Random(7), 0.0)
    assert a == b


def probation_share_of(pool_: list[Offer], new: frozenset[str], capped: bool) -> float:
    """Route 3,000 requests the way the gateway does; the share that went to `new` nodes."""
    budget = ProbationShare(share=0.1)
    rng, to_new = random.Random(5), 0
    for _ in range(3000):
        over = capped and budget.over_budget("m")
        decision = route(REQUEST, pool_, {}, Preferences(), rng, now=1000.0, price_sorted=True,
                         probation=new, probation_over_budget=over)  # fmt: skip
        chosen = decision.ranked[0].node_id
        budget.record("m", chosen in new, over)
        to_new += chosen in new
    return to_new / 3000


def test_many_fresh_keys_together_get_no_more_than_the_probation_share() -> None:
    """A sybil runs 200 fresh nodes, each cheaper than the two established ones (so a sample of
    the pool rarely holds an established worker)."""
    sybils = [Offer(f"sybil-{i:03d}", 50, 100) for i in range(200)]
    market = pool(Offer("node-old-a", 100, 200), Offer("node-old-b", 100, 200), *sybils)
    new = frozenset(o.node_id for o in sybils)
    assert probation_share_of(market, new, capped=False) > 0.9  # cheaper: they would win
    assert 0.05 < probation_share_of(market, new, capped=True) <= 0.11  # capped, not shut out


def test_probation_workers_serve_when_no_established_one_can() -> None:
    full = Offer("node-old", 100, 200, in_flight=4)
    decision = decide(pool(full, Offer("node-new", 100, 200)), probation=frozenset({"node-new"}),
                      probation_over_budget=True)  # fmt: skip
    assert [s.node_id for s in decision.ranked] == ["node-new"]
    both = decide(pool(Offer("node-old", 500, 900), Offer("node-new", 100, 200)),
                  probation=frozenset({"node-new"}), probation_over_budget=True)  # fmt: skip
    assert [s.node_id for s in both.ranked] == ["node-old", "node-new"]  # kept for failover
    assert both.ranked[1].terms["probation"] == 1.0  # and the explanation says why


def test_a_market_of_new_nodes_stops_searching_for_established_ones() -> None:
    """Everyone on probation: a capped request finds nobody established, so the next requests
    are routed without the cap (no futile walk of the pool on every request)."""
    budget = ProbationShare(share=0.1, rest_after_miss=50)
    for _ in range(500):
        budget.record("m", True)
    assert budget.over_budget("m")
    budget.record("m", True, capped=True)  # the capped search found no established worker
    assert not budget.over_budget("m")
    for _ in range(50):
        budget.record("m", True)
    assert budget.over_budget("m")  # looks again after the rest


# ---------------------------------------------------------------- LoRA adapters
SHA = "ab" * 32
WITH_ADAPTER = RouteRequest("m", prompt_tokens=100, max_tokens=100, adapter=SHA)


def lora(name: str, holds: bool = False, max_loras: int = 2, price_out: int = 200) -> Offer:
    held = frozenset({SHA} if holds else ())
    return Offer(
        name,
        100,
        200,
        adapters=held,
        max_loras=max_loras,
        adapter_price_prompt_per_mtok=100,
        adapter_price_completion_per_mtok=price_out,
    )


def test_a_worker_that_cannot_load_the_adapter_is_excluded() -> None:
    decision = route(WITH_ADAPTER, [lora("plain", max_loras=0), lora("able")], {}, Preferences(),
                     random.Random(0), now=1000.0)  # fmt: skip
    assert [s.node_id for s in decision.ranked] == ["able"]
    assert decision.excluded == {"no_adapter": 1}
    assert decision.ranked[0].terms["cold"] == RoutingPolicy().cold_load_s


def test_the_worker_holding_the_adapter_is_found_among_many_and_ranked_first() -> None:
    fleet = [lora(f"cold-{i:03}") for i in range(500)] + [lora("holder", holds=True)]
    policy = RoutingPolicy(sample_size=8)
    for seed in range(20):
        decision = route(WITH_ADAPTER, fleet, {}, Preferences(), random.Random(seed), 1000.0,
                         policy, holders=[500])  # fmt: skip
        assert decision.ranked[0].node_id == "holder"
        assert decision.ranked[0].terms["cold"] == 0.0
    blind = RoutingPolicy(sample_size=8, adapter_affinity=False)  # the baseline: no preference
    found = sum(
        any(s.node_id == "holder" for s in route(WITH_ADAPTER, fleet, {}, Preferences(),
                                                  random.Random(seed), 1000.0, blind,
                                                  holders=[500]).ranked)
        for seed in range(20)
    )  # fmt: skip
    assert found <= 2  # sampled 8 of 501 at random: rarely seen at all


def test_a_cold_worker_wins_when_the_holder_is_much_dearer_or_full() -> None:
    dear_holder = lora("holder", holds=True, price_out=2_000)
    decision = route(WITH_ADAPTER, [dear_holder, lora("cold")], {}, Preferences(),
                     random.Random(0), 1000.0)  # fmt: skip
    assert decision.ranked[0].node_id == "cold"  # 1 s of cold load beats paying 10x
    full = Offer("holder", 100, 200, in_flight=4, adapters=frozenset({SHA}), max_loras=2)
    decision = route(WITH_ADAPTER, [full, lora("cold")], {}, Preferences(), random.Random(0),
                     1000.0)  # fmt: skip
    assert [s.node_id for s in decision.ranked] == ["cold"]


def test_adapter_prices_are_what_caps_and_costs_compare() -> None:
    cheap_base_dear_adapter = lora("a", price_out=900)
    decision = route(WITH_ADAPTER, [cheap_base_dear_adapter, lora("b", price_out=300)], {},
                     Preferences(max_price_completion=500), random.Random(0), 1000.0,
                     price_sorted=True)  # fmt: skip
    assert [s.node_id for s in decision.ranked] == ["b"]
    assert decision.excluded == {"over_max_price": 1}
    base = route(REQUEST, [cheap_base_dear_adapter], {}, Preferences(max_price_completion=500),
                 random.Random(0), 1000.0, price_sorted=True)  # fmt: skip
    assert [s.node_id for s in base.ranked] == ["a"]  # without the adapter, its base price


def test_a_new_adapter_goes_to_a_worker_with_a_free_slot_before_one_that_must_evict() -> None:
    others = frozenset({"cd" * 32, "ef" * 32})
    full = Offer("full", 100, 200, adapters=others, max_loras=2)  # loading means evicting
    room = Offer("room", 100, 200, adapters=frozenset({"cd" * 32}), max_loras=2, in_flight=1)
    decision = route(WITH_ADAPTER, [full, room], {}, Preferences(), random.Random(0), 1000.0)
    assert [s.node_id for s in decision.ranked] == ["room", "full"]
    assert decision.ranked[1].terms["cold"] == 2 * decision.ranked[0].terms["cold"]


def test_without_affinity_adapter_requests_go_anywhere_they_can_run_at_random() -> None:
    fleet = [lora("holder", holds=True), lora("a"), lora("b"), lora("c")]
    blind = RoutingPolicy(adapter_affinity=False)
    firsts = {route(WITH_ADAPTER, fleet, {}, Preferences(), random.Random(seed), 1000.0,
                    blind).ranked[0].node_id for seed in range(40)}  # fmt: skip
    assert firsts == {"holder", "a", "b", "c"}
