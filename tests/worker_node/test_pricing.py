"""Price discovery's rule (worker_node.pricing) and the node's asks (worker_node.asks): the ask
climbs under unmet demand, falls when idle, stays within floor and ceiling, and cannot
oscillate faster than one reversal per REVERSE_AFTER + 1 intervals; jobs are signed at the
prices of the advert they were routed on."""

from __future__ import annotations

import itertools
import time

from protocol.advert import Advert, ModelOffer
from protocol.identity import Identity
from protocol.market import DemandBoard
from worker_node.asks import Asks, AutoPrice
from worker_node.pricing import REVERSE_AFTER, Interval, PriceLadder, PriceState, decide

LADDER = PriceLadder(floor=(100, 200), ceiling=(500, 1000), steps=4)
SHORT = Interval(full=True, jobs=5, unmet=3, queued=0)  # demand exceeds this node's slots
IDLE = Interval(full=False, jobs=0, unmet=0, queued=0)
BUSY = Interval(full=True, jobs=5, unmet=0, queued=0)  # full, but nobody turned away


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


def test_full_without_unmet_demand_or_unmet_with_free_slots_holds() -> None:
    assert run([BUSY] * 3, PriceState(rung=2)) == [2, 2, 2]
    free = Interval(full=False, jobs=2, unmet=9, queued=0)  # others are short, not this node
    assert run([free] * 3, PriceState(rung=2)) == [2, 2, 2]
    queued = Interval(full=True, jobs=2, unmet=0, queued=4)  # requests wait for a slot
    assert run([queued], PriceState(rung=2)) == [3]


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


def _board(identity: Identity, model: str, unmet: int) -> DemandBoard:
    row = {"queue_depth": 0, "windows": {"60s": {"unmet": {"capacity": unmet, "price": 0}}},
           "reserve": {"prompt": 0, "completion": 0}}  # fmt: skip
    now = time.time_ns() // 1_000_000
    return DemandBoard(identity.node_id, now, {"models": {model: row}})


def test_asks_follow_the_boards_and_jobs_are_signed_at_the_advert_they_were_routed_on() -> None:
    offer = ModelOffer("tiny", 1, 100, 200)
    asks = Asks({"tiny": AutoPrice(LADDER, interval_s=1.0)})
    asks.set(offer)
    node, coordinator = Identity.generate(), Identity.generate()
    before = Advert(node.node_id, 1_000, (asks.current["tiny"],))
    asks.remember(before)
    with asks.running("tiny"):  # its one slot busy while the market turned 3 away
        moved = asks.evaluate("tiny", [_board(coordinator, "tiny", unmet=3)])
    assert moved
    assert (asks.current["tiny"].price_prompt_per_mtok,
            asks.current["tiny"].price_completion_per_mtok) == (200, 400)  # fmt: skip
    assert "raised" in asks.note("tiny")
    # a job routed on the earlier advert is signed at its prices, a new one at the new ask
    assert asks.priced("tiny", before.issued_at_ms) == offer
    assert asks.priced("tiny", 0) == asks.current["tiny"]
    assert asks.priced("tiny", 999) == asks.current["tiny"]  # unknown: the current ask
    assert not asks.evaluate("tiny", [])  # the job ran into this interval: full, holding
    assert "holding" in asks.note("tiny")
    assert not asks.evaluate("tiny", [])  # now idle, but a reversal waits
    assert "before reversing" in asks.note("tiny")
    assert asks.evaluate("tiny", [])  # idle for long enough: back down a rung
    assert asks.current["tiny"].price_completion_per_mtok == 200


def test_fixed_prices_never_move() -> None:
    asks = Asks.fixed({"tiny": ModelOffer("tiny", 1, 100, 200)})
    assert not asks.auto
    assert asks.priced("tiny") == ModelOffer("tiny", 1, 100, 200)
    assert asks.note("tiny") == ""
