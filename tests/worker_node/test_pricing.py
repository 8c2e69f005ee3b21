"""Price discovery's rule (worker_node.pricing) and the node's asks (worker_node.asks): the ask
climbs under unmet demand, falls when idle, stays within floor and ceiling, and cannot
oscillate faster than one reversal per REVERSE_AFTER + 1 intervals; jobs are signed at the
prices of the advert they were routed on."""

from __future__ import annotations

import itertools
import time

from protocol.advert import ModelOffer
from protocol.identity import Identity
from protocol.market import DemandBoard
from tests.fake_clock import Clock
from worker_node.asks import Asks, AutoPrice
from worker_node.pricing import (
    REVERSE_AFTER,
    Interval,
    PriceLadder,
    PriceState,
    decide,
    would_pay,
)

LADDER = PriceLadder(floor=(100, 200), ceiling=(500, 1000), steps=4)
SHORT = Interval(busy_share=0.95, unmet=3, queued=0)  # demand exceeds this node's slots
IDLE = Interval(busy_share=0.0, unmet=0, queued=0)
BUSY = Interval(busy_share=1.0, unmet=0, queued=0)  # full, but nobody turned away


def run(signals: list[Interval], state: PriceState | None = None) -> list[int]:
    rungs, state = [], state or PriceState()
    for seen in signals:
        state = decide(LADDER, state, seen).state
        rungs.append(state.rung)
    return rungs


def test_unmet_demand_on_full_slots_raises_one_rung_an_interval_up_to_the_ceiling() -> None:
    assert run([SHORT] * 6) == [1, 2, 3, 4, 4, 4]
    assert LADDER.ask(4) == (500, 1000)
    decision = decide(LADDER, PriceState(rung=4), SHORT)
    assert decision.moved == 0
    assert "ceiling" in decision.reason


def test_an_idle_node_lowers_to_its_floor_and_no_further() -> None:
    assert run([IDLE] * 6, PriceState(rung=4, direction=-1)) == [3, 2, 1, 0, 0, 0]
    assert LADDER.ask(0) == (100, 200)


def test_full_or_half_busy_without_unmet_demand_holds() -> None:
    assert run([BUSY] * 3, PriceState(rung=2)) == [2, 2, 2]
    half = Interval(busy_share=0.7, unmet=0, queued=0)
    assert run([half] * 3, PriceState(rung=2)) == [2, 2, 2]
    bursty = Interval(busy_share=0.7, unmet=9, queued=0)  # turned away, but would pay this ask
    assert run([bursty] * 3, PriceState(rung=2)) == [2, 2, 2]
    priced = Interval(busy_share=0.7, unmet=9, queued=0, would_pay_now=False)  # it keeps them
    assert run([priced] * 3, PriceState(rung=2)) == [1, 0, 0]  # away: down


def test_would_pay_reads_the_limits_of_the_demand_turned_away() -> None:
    assert would_pay(500, turned_away=0, unlimited=0, limits_p50=[])  # nothing to price against
    assert would_pay(500, turned_away=10, unlimited=5, limits_p50=[100])  # half set no limit
    assert would_pay(500, turned_away=10, unlimited=1, limits_p50=[100, 600, 700])
    assert not would_pay(500, turned_away=10, unlimited=1, limits_p50=[100, 200, 700])
    queued = Interval(busy_share=0.92, unmet=0, queued=4)  # requests wait for a slot
    assert run([queued], PriceState(rung=2)) == [3]
    mostly_free = Interval(busy_share=0.3, unmet=9, queued=0)  # its price keeps work away
    assert run([mostly_free], PriceState(rung=2)) == [1]


def test_no_raise_the_demand_turned_away_would_not_pay() -> None:
    """Requests turned away whose max_price is under the next rung: raising would only
    turn more away."""
    unwilling = Interval(busy_share=1.0, unmet=5, queued=3, would_pay_more=False)
    decision = decide(LADDER, PriceState(rung=1), unwilling)
    assert decision.moved == 0
    assert "would not pay" in decision.reason


def test_a_reversal_waits_and_alternating_demand_cannot_make_it_oscillate() -> None:
    raised = decide(LADDER, PriceState(), SHORT)
    held = decide(LADDER, raised.state, IDLE)
    assert held.moved == 0
    assert "before reversing" in held.reason
    flapping = [SHORT, IDLE] * 15  # the worst case: the signal flips every interval
    rungs = run(flapping)
    moves = [b - a for a, b in zip([0, *rungs], rungs, strict=False) if b != a]
    reversals = sum(1 for a, b in itertools.pairwise(moves) if a != b)
    assert all(abs(m) == 1 for m in moves)  # one rung at a time
    assert reversals <= len(flapping) // (REVERSE_AFTER + 1)
    assert all(0 <= r <= LADDER.steps for r in rungs)


def test_a_reserve_lifts_the_floor_but_never_the_ceiling() -> None:
    assert LADDER.ask(0, reserve=(300, 100)) == (300, 200)
    assert LADDER.ask(4, reserve=(300, 100)) == (500, 1000)
    assert LADDER.ask(0, reserve=(900, 9000)) == (500, 1000)


def _board(identity: Identity, model: str, unmet: int, reserve: int = 0) -> DemandBoard:
    window = {"unmet": {"capacity": unmet, "price": 0},
              "unmet_max_price": {"p50": None, "unlimited": unmet}}  # fmt: skip
    row = {"queue_depth": 0, "windows": {"60s": window},
           "reserve": {"prompt": reserve, "completion": reserve}}  # fmt: skip
    now = time.time_ns() // 1_000_000
    return DemandBoard(identity.node_id, now, {"models": {model: row}})


def test_asks_follow_the_boards_with_each_coordinators_reserve() -> None:
    clock = Clock()
    asks = Asks({"tiny": AutoPrice(LADDER, interval_s=10.0)}, clock)
    asks.set(ModelOffer("tiny", 1, 100, 200))
    plain, reserved = Identity.generate(), Identity.generate()
    boards = [_board(plain, "tiny", unmet=3), _board(reserved, "tiny", unmet=0, reserve=450)]
    with asks.running("tiny"):  # its one slot busy all interval while the market turned 3 away
        clock.now += 10
        assert asks.evaluate("tiny", boards)
    assert "raised" in asks.note("tiny")
    asked = asks.offers_for(plain.node_id)["tiny"]
    assert (asked.price_prompt_per_mtok, asked.price_completion_per_mtok) == (200, 400)
    lifted = asks.offers_for(reserved.node_id)["tiny"]  # that operator's reserve lifts it there
    assert (lifted.price_prompt_per_mtok, lifted.price_completion_per_mtok) == (462, 587)
    calm = [_board(plain, "tiny", unmet=0), _board(reserved, "tiny", unmet=0, reserve=450)]
    with asks.running("tiny"):  # busy half the interval: neither full nor mostly free
        clock.now += 5
    clock.now += 5
    assert not asks.evaluate("tiny", calm)
    assert "holding: slots 50% busy" in asks.note("tiny")
    clock.now += 10  # idle now, but a reversal waits
    assert not asks.evaluate("tiny", calm)
    assert "before reversing" in asks.note("tiny")
    clock.now += 10
    assert asks.evaluate("tiny", calm)  # idle for long enough: back down a rung
    assert asks.offers_for(plain.node_id)["tiny"].price_completion_per_mtok == 200


def test_a_malformed_board_is_ignored() -> None:
    clock = Clock()
    asks = Asks({"tiny": AutoPrice(LADDER, interval_s=1.0)}, clock)
    asks.set(ModelOffer("tiny", 1, 100, 200))
    coordinator = Identity.generate()
    now = time.time_ns() // 1_000_000
    junk = [DemandBoard(coordinator.node_id, now, {"models": []}),
            DemandBoard(coordinator.node_id, now, {"models": {"tiny": {"windows": 7}}}),
            _board(coordinator, "tiny", unmet=-5)]  # fmt: skip
    with asks.running("tiny"):
        clock.now += 1
        assert not asks.evaluate("tiny", junk)  # no demand read from them: it holds
    assert "no unmet demand" in asks.note("tiny")


def test_fixed_prices_never_move() -> None:
    asks = Asks.fixed({"tiny": ModelOffer("tiny", 1, 100, 200)})
    assert not asks.auto
    assert asks.offers_for("any")["tiny"] == ModelOffer("tiny", 1, 100, 200)
    assert asks.note("tiny") == ""
