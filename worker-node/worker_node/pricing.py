"""Price discovery for one model a node prices itself (`price = "auto"`): a pure rule from
what the node saw in one interval and what the demand boards say, to its next ask.

The ask sits on a ladder from the floor (what serving costs the operator) to the ceiling, in
`steps` rungs. Each interval it may move one rung at most:
- up when its slots were busy (FULL of the interval, time-weighted) and the market still
  turned requests away for lack of capacity or had requests queued for a slot, and those
  requests would pay the next rung: demand exceeds supply at this price;
- down when its slots were mostly free (under SPARE of the interval), or not full while the
  market turned away requests that would not pay this ask: its price keeps that work away;
- otherwise it holds.
So that the market cannot oscillate, a change of direction waits `REVERSE_AFTER` intervals
of holding: between two reversals the ask holds at least that long, and it never moves more
than one rung an interval. Clients' `max_price` keeps its meaning (the coordinator routes
only asks under it). A coordinator's reserve price, published on its board, lifts the ladder's
base at that coordinator (worker_node.asks): the market's rule, applied at once, not a move.
"""

from __future__ import annotations

from dataclasses import dataclass

REVERSE_AFTER = 2  # intervals the ask holds before it may move the other way
FULL = 0.9  # share of the interval's slot time in use above which the slots count as full
SPARE = 0.5  # … and below which they are mostly free


@dataclass(frozen=True)
class PriceLadder:
    floor: tuple[int, int]  # (prompt, completion) per 1M tokens: what serving costs
    ceiling: tuple[int, int]
    steps: int = 10

    def ask(self, rung: int, reserve: tuple[int, int] = (0, 0)) -> tuple[int, int]:
        """The (prompt, completion) ask on `rung`; a reserve above the floor lifts it, never
        above the ceiling."""
        out = []
        for low, high, least in zip(self.floor, self.ceiling, reserve, strict=True):
            base = min(max(low, least), high)
            out.append(base + (high - base) * rung // self.steps)
        return out[0], out[1]


@dataclass(frozen=True)
class Interval:
    """What one interval showed."""

    busy_share: float  # of the model's slot time in the interval, the share jobs used
    unmet: int  # requests the boards say went unserved for lack of capacity (last minute)
    queued: int  # requests waiting for a slot now, on the boards
    # the requests turned away would pay the next rung (see `would_pay`): otherwise a higher
    # ask only turns more away
    would_pay_more: bool = True
    # … and this ask: if not, this node's price is what keeps them away
    would_pay_now: bool = True


@dataclass(frozen=True)
class PriceState:
    rung: int = 0
    direction: int = 0  # of the last change: +1 up, -1 down, 0 none yet
    held: int = 0  # intervals since the last change


@dataclass(frozen=True)
class Decision:
    state: PriceState
    moved: int  # +1, -1 or 0
    reason: str


def decide(ladder: PriceLadder, state: PriceState, seen: Interval) -> Decision:
    """The next rung, and why (said to the operator: logged and shown in the provider view)."""
    busy = f"slots {seen.busy_share:.0%} busy"
    short = seen.unmet > 0 or seen.queued > 0
    if seen.busy_share >= FULL and short and not seen.would_pay_more:
        return _hold(state, f"holding: {busy}, but the demand turned away would not pay the "
                            "next rung")  # fmt: skip
    if seen.busy_share >= FULL and short:
        want = 1
        why = f"{busy} and demand unmet ({seen.unmet} turned away, {seen.queued} queued)"
    elif seen.busy_share < SPARE:
        want, why = -1, f"{busy}: the price keeps work away"
    elif seen.unmet and not seen.would_pay_now:
        want, why = -1, f"{busy} while {seen.unmet} requests its price is above went unmet"
    else:
        unmet = f"{seen.unmet} unmet" if seen.unmet else "no unmet demand"
        return _hold(state, f"holding: {busy}, {unmet}")
    if state.rung >= ladder.steps if want > 0 else state.rung <= 0:
        return _hold(state, f"{why}; already at the {'ceiling' if want > 0 else 'floor'}")
    if state.direction == -want and state.held < REVERSE_AFTER:
        return _hold(state, f"{why}; holding {REVERSE_AFTER - state.held} more interval(s) "
                            "before reversing")  # fmt: skip
    moved = PriceState(state.rung + want, want, 0)
    return Decision(moved, want, f"{'raised' if want > 0 else 'lowered'}: {why}")


def _hold(state: PriceState, reason: str) -> Decision:
    return Decision(PriceState(state.rung, state.direction, state.held + 1), 0, reason)


def would_pay(ask: int, turned_away: int, unlimited: int, limits_p50: list[int]) -> bool:
    """Whether the requests turned away for capacity would mostly pay `ask`: none were
    (nothing to price against), most set no max_price, or the median of the others' limits
    (one per board) reaches it."""
    if not turned_away or 2 * unlimited >= turned_away:
        return True
    return bool(limits_p50) and sorted(limits_p50)[len(limits_p50) // 2] >= ask
