"""Price discovery for one model a node prices itself (`price = "auto"`): a pure rule from
what the node saw in one interval and what the demand boards say, to its next ask.

The ask sits on a ladder from the floor (what serving costs the operator) to the ceiling, in
`steps` rungs. Each interval it may move one rung at most:
- up when its slots were all busy and the market still turned requests away for lack of
  capacity (or had requests queued for a slot): demand exceeds supply at this price;
- down when it ran no job in the interval: its price keeps work away;
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

    full: bool  # every slot of the model was busy at some moment
    jobs: int  # jobs the node started for the model
    unmet: int  # requests the boards say went unserved for lack of capacity (last minute)
    queued: int  # requests waiting for a slot now, on the boards


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
    short = seen.unmet > 0 or seen.queued > 0
    if seen.full and short:
        want = 1
        why = f"slots full and demand unmet ({seen.unmet} turned away, {seen.queued} queued)"
    elif seen.jobs == 0 and not seen.full:
        want, why = -1, "idle: no job in the last interval"
    else:
        slots = "slots full" if seen.full else "free slots"
        unmet = f"{seen.unmet} unmet" if seen.unmet else "no unmet demand"
        return _hold(state, f"holding: {seen.jobs} jobs, {slots}, {unmet}")
    if state.rung >= ladder.steps if want > 0 else state.rung <= 0:
        return _hold(state, f"{why}; already at the {'ceiling' if want > 0 else 'floor'}")
    if state.direction == -want and state.held < REVERSE_AFTER:
        return _hold(state, f"{why}; holding {REVERSE_AFTER - state.held} more interval(s) "
                            "before reversing")  # fmt: skip
    moved = PriceState(state.rung + want, want, 0)
    return Decision(moved, want, f"{'raised' if want > 0 else 'lowered'}: {why}")


def _hold(state: PriceState, reason: str) -> Decision:
    return Decision(PriceState(state.rung, state.direction, state.held + 1), 0, reason)
