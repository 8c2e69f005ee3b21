"""The prefix index: prompts as chained block hashes, what each worker was recently sent, and
routing that prefers the worker holding the longest prefix while it has room."""

from __future__ import annotations

import random

from coordinator.services.prefixes import PrefixIndex, prefix_chain
from coordinator.services.routing import Preferences, RouteRequest, RoutingPolicy, route
from coordinator.services.stats import WorkerStats
from protocol.completions import CHAT, COMPLETIONS
from tests.coordinator.test_routing import Offer

SYSTEM = {"role": "system", "content": "You answer questions about the market. " * 20}
TURN_1 = [SYSTEM, {"role": "user", "content": "What is a receipt?"}]
TURN_2 = [*TURN_1, {"role": "assistant", "content": "A signed record."},
          {"role": "user", "content": "Who signs it?"}]  # fmt: skip
REQUEST = RouteRequest("m", prompt_tokens=100, max_tokens=100)


def test_prompts_share_blocks_exactly_as_far_as_they_agree() -> None:
    one, two = prefix_chain(CHAT, TURN_1), prefix_chain(CHAT, TURN_2)
    assert [b.digest for b in two[:2]] == [b.digest for b in one]
    other_system = [{"role": "system", "content": "Another."}, *TURN_1[1:]]
    assert prefix_chain(CHAT, other_system)[1].digest != one[1].digest  # same message, later
    text = "x" * 600
    assert len(prefix_chain(COMPLETIONS, text)) == 3  # 256-character blocks
    assert prefix_chain(COMPLETIONS, [1, 2, 3])[0].covers == 3  # token ids
    assert prefix_chain(COMPLETIONS, ["a", "b"]) == ()  # a batch of prompts: not chained


def test_the_next_turn_finds_the_worker_sent_the_last_one() -> None:
    index = PrefixIndex()
    index.record("m", prefix_chain(CHAT, TURN_1), "node-a", now=0.0)
    index.record("m", prefix_chain(CHAT, [SYSTEM]), "node-b", now=0.0)
    shares = index.shares("m", prefix_chain(CHAT, TURN_2), now=1.0)
    assert set(shares) == {"node-a", "node-b"}
    assert shares["node-b"] < shares["node-a"] < 1.0  # b holds the system prompt only
    assert index.shares("other-model", prefix_chain(CHAT, TURN_2), now=1.0) == {}


def test_entries_expire_and_the_index_stays_bounded() -> None:
    index = PrefixIndex(capacity=3, ttl_s=10.0)
    index.record("m", prefix_chain(CHAT, TURN_1), "node-a", now=0.0)
    assert index.shares("m", prefix_chain(CHAT, TURN_1), now=11.0) == {}
    index.record("m", prefix_chain(CHAT, TURN_2), "node-a", now=20.0)  # four blocks
    assert len(index) == 3
    # the oldest block (the system prompt's) went first: nothing matches from the start now
    assert index.shares("m", prefix_chain(CHAT, TURN_2), now=21.0) == {}
    index.record("m", (), "node-c", now=30.0, session="conv-1")
    assert index.session_holder("m", "conv-1", now=31.0) == "node-c"
    assert index.session_holder("m", "conv-1", now=41.0) is None


def test_routing_prefers_the_holder_until_it_is_busy_then_spreads() -> None:
    holder, idle = Offer("holder", 100, 200, in_flight=1), Offer("idle", 100, 200)
    decision = route(REQUEST, [holder, idle], {}, Preferences(), random.Random(0), 1000.0,
                     cached={0: 0.9})  # fmt: skip
    assert decision.ranked[0].node_id == "holder"
    assert decision.ranked[0].terms["cache"] == 0.9
    busy = Offer("holder", 100, 200, in_flight=3)  # 3 of 4 slots: past the balance threshold
    decision = route(REQUEST, [busy, idle], {}, Preferences(), random.Random(0), 1000.0,
                     cached={0: 0.9})  # fmt: skip
    assert decision.ranked[0].node_id == "idle"
    blind = route(REQUEST, [holder, idle], {}, Preferences(), random.Random(0), 1000.0)
    assert blind.ranked[0].node_id == "idle"  # without the cache term, load decides


def test_the_holder_is_looked_at_among_many() -> None:
    fleet = [Offer(f"n-{i:03}", 100, 200) for i in range(500)] + [Offer("holder", 100, 200)]
    for seed in range(10):
        decision = route(REQUEST, fleet, {}, Preferences(), random.Random(seed), 1000.0,
                         RoutingPolicy(sample_size=8), cached={500: 0.5})  # fmt: skip
        assert decision.ranked[0].node_id == "holder"


def test_holding_the_whole_prompt_does_not_make_a_slow_worker_fast() -> None:
    """The cache bonus is bounded: a worker measured at 1.5 s to first token that holds the
    whole prompt still loses to a healthy one (scaling its TTFT by the cached share did not)."""
    slow, fast = WorkerStats(), WorkerStats()
    for _ in range(5):
        slow.record_latency(1.5, 0.01)
        fast.record_latency(0.02, 0.01)
    pool = [Offer("holder", 100, 200), Offer("healthy", 100, 200)]
    decision = route(REQUEST, pool, {"holder": slow, "healthy": fast}, Preferences(),
                     random.Random(0), 1000.0, cached={0: 1.0})  # fmt: skip
    assert decision.ranked[0].node_id == "healthy"
